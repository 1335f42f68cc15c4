// The module omninft_fast._C: the CPU kernels as torch.library ops (fast dispatch, torch.compile) and pybind11
// functions (including the variants that write into caller-provided buffers).
#include <torch/extension.h>
#include <torch/library.h>

#include "nft_loss.h"

TORCH_LIBRARY_FRAGMENT(omninft_fast, m) {
  m.def(
      "nft_loss_cpp_forward(Tensor v_theta, Tensor v_old, Tensor target, Tensor r, Tensor? token_weight, "
      "Tensor? sample_weight, Tensor? v_ref, Tensor? x0_norm_t, Tensor? kl_t, float beta, float policy_scale, "
      "float kl_weight) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(omninft_fast, CPU, m) {
  m.impl("nft_loss_cpp_forward", &omninft::nft_loss_forward);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "CPU kernels of omninft-fast (ATen + OpenMP)";
  m.def("nft_loss_forward", &omninft::nft_loss_forward, "Fused NFT loss: returns (loss, dloss/dv_theta)",
        pybind11::arg("v_theta"), pybind11::arg("v_old"), pybind11::arg("target"), pybind11::arg("r"),
        pybind11::arg("token_weight"), pybind11::arg("sample_weight"), pybind11::arg("v_ref"),
        pybind11::arg("x0_norm_t"), pybind11::arg("kl_t"), pybind11::arg("beta"),
        pybind11::arg("policy_scale"), pybind11::arg("kl_weight"));
  m.def("nft_loss_forward_out", &omninft::nft_loss_forward_out,
        "Fused NFT loss writing dloss/dv_theta into grad: returns the loss", pybind11::arg("grad"),
        pybind11::arg("v_theta"), pybind11::arg("v_old"), pybind11::arg("target"), pybind11::arg("r"),
        pybind11::arg("token_weight"), pybind11::arg("sample_weight"), pybind11::arg("v_ref"),
        pybind11::arg("x0_norm_t"), pybind11::arg("kl_t"), pybind11::arg("beta"),
        pybind11::arg("policy_scale"), pybind11::arg("kl_weight"));
}
