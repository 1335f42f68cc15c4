// Micro-benchmark of omninft::nft_loss_forward against a copy of the same bytes, from C++ (no Python overhead).
//
// Usage: bench_nft_loss [MiB per velocity tensor ...]   (default: 4 64 256)
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "nft_loss.h"

namespace {

template <typename F>
double best_seconds(F&& f, int repeats = 7) {
  double best = 1e30;
  for (int i = 0; i < repeats; ++i) {
    const auto start = std::chrono::steady_clock::now();
    f();
    best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
  }
  return best;
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<int64_t> sizes_mib;
  for (int i = 1; i < argc; ++i) {
    sizes_mib.push_back(std::atoll(argv[i]));
  }
  if (sizes_mib.empty()) {
    sizes_mib = {4, 64, 256};
  }
  std::printf("threads %d\n%10s %12s %12s %12s %10s\n", at::get_num_threads(), "MiB", "fused ms", "out ms",
              "copy_ ms", "bw/copy");
  for (const int64_t mib : sizes_mib) {
    const int64_t channels = 128;
    const int64_t tokens = std::max<int64_t>(1, mib * (1 << 20) / 4 / channels);
    const at::Tensor theta = at::randn({1, tokens, channels});
    const at::Tensor old = at::randn({1, tokens, channels});
    const at::Tensor target = at::randn({1, tokens, channels});
    const at::Tensor r = at::rand({1});
    at::Tensor grad = at::empty_like(theta);
    at::Tensor dst = at::empty_like(theta);
    const double fused = best_seconds([&] {
      omninft::nft_loss_forward(theta, old, target, r, std::nullopt, std::nullopt, std::nullopt, std::nullopt,
                                std::nullopt, 1.0, 1.0, 0.0);
    });
    const double out = best_seconds([&] {
      omninft::nft_loss_forward_out(grad, theta, old, target, r, std::nullopt, std::nullopt, std::nullopt,
                                    std::nullopt, std::nullopt, 1.0, 1.0, 0.0);
    });
    const double copy = best_seconds([&] { dst.copy_(theta); });
    // The loss moves 4 tensors (3 reads, 1 write), a copy 2: bandwidth fraction of the preallocated variant.
    std::printf("%10lld %12.3f %12.3f %12.3f %10.2f\n", static_cast<long long>(mib), fused * 1e3, out * 1e3,
                copy * 1e3, (4.0 / out) / (2.0 / copy));
  }
  return 0;
}
