// env_switch.h: EnvSwitch, a process-wide dispatch setting read once from the environment (host code).
#pragma once
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <string>

// A process-wide switch of the kernels' dispatch, for benchmarks and tests: `preset`, or `other` where the
// environment variable `env` reads as that number, looked up at the first get(); set(v) replaces it (v < 0 only
// asks) and returns the value before.
class EnvSwitch {
  public:
    constexpr EnvSwitch(const char* env, int preset, int other) : env_(env), preset_(preset), other_(other) {}
    int get() {
        int v = value_.load(std::memory_order_relaxed);
        if (v < 0) {  // racing first calls read the same environment
            const char* s = std::getenv(env_);
            v = s && std::strcmp(s, std::to_string(other_).c_str()) == 0 ? other_ : preset_;
            value_.store(v, std::memory_order_relaxed);
        }
        return v;
    }
    int set(int v) {
        const int before = get();
        if (v >= 0) value_.store(v, std::memory_order_relaxed);
        return before;
    }

  private:
    const char* env_;
    int preset_, other_;
    std::atomic<int> value_{-1};
};
