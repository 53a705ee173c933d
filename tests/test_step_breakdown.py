"""The training-step breakdown: op classes by kernel or aten op name, and a real profile of the tiny UNet step."""

import json

import pytest

from benchmarks.step_breakdown import OTHER, main, op_class, split_by_class, top_ops

COPIES, OPTIMIZER = "copies (layout, dtype, memory)", "optimizer, EMA and clipping"


@pytest.mark.parametrize("name, label", [
    ("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc_tilesize128x128x64", "convolution"),
    ("sm90_xmma_dgrad_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nchw", "convolution"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7_64x128x128_4x1x1_kernel0_0",
     "attention"),
    ("void pytorch_flash::flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel<Flash_bwd_kernel_traits>", "attention"),
    ("nvjet_hsh_256x128_64x4_1x2_h_bz_coopA_NTN", "matmul"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1", "matmul"),
    ("triton_red_fused_native_group_norm_silu_12", "normalisation"),
    ("triton_poi_fused__to_copy_add_mul_5", OTHER),
    # a convolution's bias and GroupNorm fused by Inductor: the pass is the norm's, the convolution another kernel
    ("triton_red_fused_convolution_native_group_norm_1", "normalisation"),
    ("triton_red_fused_convolution_backward_native_group_norm_backward_3", "normalisation"),
    ("triton_poi_fused_convolution_0", OTHER),
    ("void at::native::elementwise_kernel<128, 4, at::native::direct_copy_kernel_cuda>", COPIES),
    ("void at::native::(anonymous namespace)::RowwiseMomentsCUDAKernel<float>", "normalisation"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::GeluCUDAKernelImpl>", OTHER),
    ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamMathFunctor>", OPTIMIZER),
    ("Memcpy DtoD (Device -> Device)", COPIES),
    # cuDNN's layout turns around an NCHW convolution, and its SDPA backward's helpers (named on an H100)
    ("void cudnn::engines_precompiled::nchwToNhwcKernel<__nv_bfloat16, __nv_bfloat16, float, false, true, "
     "(cudnnKernelDataType_t)2>", COPIES),
    ("void cudnn::engines_precompiled::nhwcToNchwKernel<__nv_bfloat16, __nv_bfloat16, float, true, false>", COPIES),
    ("void cudnn::fusion::compute_dot_do_o_specialized<true, 64>(void const*, void const*, void*)", "attention"),
    ("void cudnn::fusion::convert_dq_to_16bits<true>(void const*, void*, unsigned int)", "attention"),
    ("aten::normal_", OTHER),
    ("aten::convolution_backward", "convolution"),
    ("aten::_scaled_dot_product_flash_attention_for_cpu", "attention"),
    ("aten::addmm", "matmul"),
    ("aten::native_group_norm", "normalisation"),
])
def test_kernels_and_ops_fall_in_their_class(name, label):
    assert op_class(name) == label


def test_bookkeeping_rows_are_not_counted_and_every_class_is_reported():
    totals = split_by_class([("aten::mm", 3.0), ("aten::addmm", 2.0), ("ProfilerStep#1", 100.0),
                             ("cudaLaunchKernel", 50.0), ("aten::add_", 1.0)])
    assert totals["matmul"] == 5.0 and totals[OTHER] == 1.0 and sum(totals.values()) == 6.0
    assert set(totals) == {"optimizer, EMA and clipping", "attention", "convolution", "matmul", "normalisation", OTHER,
                           "copies (layout, dtype, memory)"}


def test_the_busiest_kernels_come_first_per_step_without_bookkeeping_rows():
    rows = [("aten::mm", 30.0, 4), ("ProfilerStep#1", 900.0, 2), ("triton_poi_fused_add_0", 50.0, 8),
            ("aten::native_group_norm", 10.0, 2)]
    top = top_ops(rows, steps=2, count=2)
    assert [row["name"] for row in top] == ["triton_poi_fused_add_0", "aten::mm"]
    assert top[0] == {"name": "triton_poi_fused_add_0", "class": OTHER, "ms_per_step": 0.025, "calls_per_step": 4}
    assert top[1]["class"] == "matmul" and top_ops(rows, steps=2, count=0) == []


def test_the_tiny_step_is_profiled_into_classes_that_add_up_to_the_step(tmp_path):
    out = tmp_path / "breakdown.json"
    result = main(["--preset", "tiny", "--steps", "2", "--warmup", "1", "--device", "cpu", "--top", "5",
                   "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    top = result["top_kernels"]
    assert len(top) == 5 and [row["ms_per_step"] for row in top] == sorted((row["ms_per_step"] for row in top),
                                                                           reverse=True)
    assert result["launches_per_step"] >= sum(row["calls_per_step"] for row in top) > 0
    classes = result["classes"]
    for label in ("convolution", "attention", "matmul", "normalisation", OTHER, "optimizer, EMA and clipping"):
        assert classes[label]["ms"] > 0, label
    assert result["flops_per_step"] > 0 and result["mfu"] is None  # no MFU off CUDA
    # one tiny step: batch 16 of 8x8 latents through a ~1 M parameter UNet, forward and backward
    assert 1e8 < result["flops_per_step"] < 1e11


@pytest.mark.parametrize("flag", ["--warmup", "--steps"])
def test_no_steps_to_time_is_refused_before_the_model_is_built(flag):
    from engine.errors import UserError

    with pytest.raises(UserError, match="--warmup and --steps must be at least 1"):
        main(["--preset", "tiny", flag, "0", "--device", "cpu"])
