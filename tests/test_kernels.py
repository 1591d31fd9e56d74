"""The Triton FlashAttention kernel (distilqa/kernels) against the eager core, on CPU in Triton's interpreter.

Triton decides when it is first imported whether kernels run in its interpreter (TRITON_INTERPRET=1):
its own library functions are wrapped for one or the other then. In the default suite something has
imported Triton long before this module (``import distilqa`` imports torch._dynamo, which imports
Triton), so these tests cannot switch the interpreter on here. Instead, ``test_kernels_in_the_interpreter``
runs this file again in a fresh process with TRITON_INTERPRET=1, where the kernel tests run and the
tests that need the compiler instead are skipped; in this process it is the other way round.
Run ``TRITON_INTERPRET=1 pytest tests/test_kernels.py`` to see the kernel tests one by one.

Tiles are 16 x 16 in the interpreter, so small shapes already span several tiles: the online
softmax's rescaling between tiles is exercised (a deliberate bug there fails these tests; see
notes/issue11.md). Tolerances are small factors of what was measured (fp32 worst case 1.1e-6).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton", reason="Triton is not installed (pip install triton, or the 'test' extra)")

from distilqa import DistilBertConfig, DistilBertForQuestionAnswering
from distilqa.attention import PackedWindows, attend, resolve_attention
from distilqa.kernels import flash_attention, interpreting
from distilqa.model import eager_attention

ROOT = Path(__file__).resolve().parents[1]
INTERPRETER = interpreting()


@pytest.fixture
def in_the_interpreter():
    if not INTERPRETER:
        pytest.skip("runs in a fresh process with TRITON_INTERPRET=1 (test_kernels_in_the_interpreter)")


@pytest.fixture
def outside_the_interpreter():
    if INTERPRETER:
        pytest.skip("needs a process without TRITON_INTERPRET=1")


pytestmark = pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION:UserWarning")

FP32_TOLERANCE = 5e-6  # measured worst case 1.1e-6 over these tests
# fp16 / bf16: the kernel keeps scores and sums in fp32 but rounds P to the inputs' dtype before P V
# (as on the GPU); eager computes everything in that dtype. Measured worst |kernel - eager| over these
# tests, against eager in the same dtype and in fp32: fp16 9.8e-4, bf16 1.6e-2 (outputs of magnitude up to
# ~1.5: one or two units in the last place).
LOW_PRECISION_TOLERANCE = {torch.float16: 3e-3, torch.bfloat16: 3e-2}


@pytest.mark.usefixtures("outside_the_interpreter")
def test_kernels_in_the_interpreter():
    """This file's kernel tests, in a fresh process whose Triton runs the interpreter (see the top)."""
    environment = {**os.environ, "TRITON_INTERPRET": "1", "TRANSFORMERS_VERBOSITY": "error"}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(Path(__file__))]
    result = subprocess.run(command, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (
        f"kernel tests failed in the interpreter:\n{result.stdout[-6000:]}{result.stderr[-3000:]}"
    )
    assert " passed" in result.stdout and " failed" not in result.stdout


def random_qkv(batch, heads, seq, head_dim=64, dtype=torch.float32, seed=0, layout_of_the_model=True):
    """q, k, v (batch, heads, seq, head_dim); by default, like the model makes them: transposed views
    of (batch, seq, heads, head_dim), not contiguous."""
    generator = torch.Generator().manual_seed(seed)
    shape = (batch, seq, heads, head_dim) if layout_of_the_model else (batch, heads, seq, head_dim)
    tensors = [torch.randn(*shape, generator=generator).to(dtype) for _ in range(3)]
    return [t.transpose(1, 2) if layout_of_the_model else t for t in tensors]


def key_mask_from_lengths(lengths, seq):
    """(batch, 1, 1, seq) bool, True at the first ``length`` keys of each row."""
    return (torch.arange(seq)[None, :] < torch.tensor(lengths)[:, None])[:, None, None, :]


def kernel(query, key, value, mask, **settings):
    """The kernel given the model's mask types, converted to its plain tensors as the triton core does."""
    if isinstance(mask, PackedWindows):
        return flash_attention(
            query, key, value, cu_seqlens=mask.cu_seqlens(query.device), max_seqlen=max(mask.lengths), **settings
        )
    return flash_attention(query, key, value, key_mask=None if mask is None else mask[:, 0, 0, :], **settings)


def eager(query, key, value, mask):
    """The eager core's context, packed windows included (run window by window)."""
    return attend(eager_attention, query, key, value, mask)[0]


def max_diff(a, b) -> float:
    return (a.float() - b.float()).abs().max().item()


# -- fp32 against the eager core ----------------------------------------------------------------------


@pytest.mark.usefixtures("in_the_interpreter")
@pytest.mark.parametrize("seq", [1, 16, 45])
def test_no_mask_matches_eager_fp32(seq):
    """seq 1 (one key), 16 (one full tile), 45 (three tiles, the last one partial)."""
    q, k, v = random_qkv(batch=2, heads=2, seq=seq)
    context = flash_attention(q, k, v)
    assert context.shape == (2, 2, seq, 64) and context.dtype == torch.float32
    assert context.transpose(1, 2).is_contiguous(), "heads merge without a copy"
    assert max_diff(context, eager(q, k, v, None)) <= FP32_TOLERANCE


@pytest.mark.usefixtures("in_the_interpreter")
def test_padding_matches_eager_fp32():
    """Rows of 40, 23, 17 and 1 real keys out of 40 (several tiles, partial ones, a length-1 row)."""
    q, k, v = random_qkv(batch=4, heads=2, seq=40, seed=1)
    mask = key_mask_from_lengths([40, 23, 17, 1], 40)
    context = kernel(q, k, v, mask)
    assert max_diff(context, eager(q, k, v, mask)) <= FP32_TOLERANCE
    # The padded row gives what the same row without its padding gives.
    short = kernel(q[1:2, :, :23], k[1:2, :, :23], v[1:2, :, :23], None)
    assert max_diff(context[1:2, :, :23], short) <= FP32_TOLERANCE


@pytest.mark.usefixtures("in_the_interpreter")
def test_padding_first_is_forgotten_when_real_keys_come_later():
    """Keys 0-19 padding, 20-39 real: the first tile holds only padding, which must be rescaled to
    weight 0 once the first real key is seen (alpha = exp(PADDING - m) = 0), plus a scattered mask."""
    q, k, v = random_qkv(batch=2, heads=2, seq=40, seed=2)
    mask = torch.zeros(2, 1, 1, 40, dtype=torch.bool)
    mask[0, ..., 20:] = True
    mask[1, ..., ::3] = True
    context = kernel(q, k, v, mask)
    assert max_diff(context, eager(q, k, v, mask)) <= FP32_TOLERANCE


@pytest.mark.usefixtures("in_the_interpreter")
def test_a_row_of_only_padding_gets_the_eager_cores_uniform_weights():
    """Documented behaviour: a query whose keys are all padding weighs all seq keys of its row
    equally, so its context is the mean of every value vector of the row, padding included, exactly
    as the eager core (masked_fill with finfo.min) gives; never NaN."""
    q, k, v = random_qkv(batch=3, heads=2, seq=37, seed=3)
    mask = key_mask_from_lengths([37, 0, 5], 37)
    context = kernel(q, k, v, mask)
    mean_of_all_values = v[1].mean(dim=1, keepdim=True).expand(2, 37, 64)  # (heads, seq, head_dim)
    assert max_diff(context[1], mean_of_all_values) <= FP32_TOLERANCE
    assert max_diff(context, eager(q, k, v, mask)) <= FP32_TOLERANCE
    assert torch.isfinite(context).all()


@pytest.mark.usefixtures("in_the_interpreter")
def test_packed_windows_match_eager_fp32():
    """Windows of 1, 17, 16, 33 and 5 tokens (length 1, one full tile, partial tiles) in one row."""
    windows = PackedWindows((1, 17, 16, 33, 5))
    q, k, v = random_qkv(batch=1, heads=2, seq=windows.total, seed=4)
    context = kernel(q, k, v, windows)
    assert context.shape == (1, 2, 72, 64)
    assert max_diff(context, eager(q, k, v, windows)) <= FP32_TOLERANCE
    # Attention stays inside each window: the window of 33 alone gives the same.
    alone = kernel(q[:, :, 34:67], k[:, :, 34:67], v[:, :, 34:67], None)
    assert max_diff(context[:, :, 34:67], alone) <= FP32_TOLERANCE


@pytest.mark.usefixtures("in_the_interpreter")
def test_tile_sizes_and_head_dim_32_do_not_change_the_result():
    q, k, v = random_qkv(batch=2, heads=1, seq=50, head_dim=32, seed=5, layout_of_the_model=False)
    mask = key_mask_from_lengths([50, 31], 50)
    expected = eager(q, k, v, mask)
    for block_m, block_n in ((16, 32), (32, 16), (64, 64)):
        context = kernel(q, k, v, mask, block_m=block_m, block_n=block_n)
        assert max_diff(context, expected) <= FP32_TOLERANCE, (block_m, block_n)


# -- fp16 and bf16 ------------------------------------------------------------------------------------


@pytest.mark.usefixtures("in_the_interpreter")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision_matches_eager(dtype):
    """Padding, an all-padding row, and packed windows, in fp16 and bf16, against the eager core in the
    same dtype; and closer to the fp32 truth than the stated tolerance too."""
    tolerance = LOW_PRECISION_TOLERANCE[dtype]
    q, k, v = random_qkv(batch=3, heads=2, seq=40, seed=6)
    mask = key_mask_from_lengths([40, 0, 19], 40)
    windows = PackedWindows((1, 17, 22))
    for inputs, m in (((q, k, v), mask), ((q[:1], k[:1], v[:1]), windows)):
        low = [t.to(dtype) for t in inputs]
        context = kernel(*low, m)
        assert context.dtype == dtype and torch.isfinite(context).all()
        assert max_diff(context, eager(*low, m)) <= tolerance
        assert max_diff(context, eager(*(t.float() for t in low), m)) <= tolerance


# -- the whole model ----------------------------------------------------------------------------------

# head_dim = dim / n_heads = 64, as in DistilBERT
TINY_CONFIG = dict(vocab_size=300, dim=128, n_layers=2, n_heads=2, hidden_dim=256, max_position_embeddings=64)


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return DistilBertForQuestionAnswering(DistilBertConfig(**TINY_CONFIG), attn_implementation="eager").eval()


@pytest.mark.usefixtures("in_the_interpreter")
def test_model_with_the_triton_core_matches_eager_logits(tiny_model):
    input_ids = torch.randint(0, 300, (3, 33), generator=torch.Generator().manual_seed(7))
    attention_mask = key_mask_from_lengths([33, 20, 1], 33)[:, 0, 0, :].long()
    packed_ids, lengths = input_ids[:1, :30], [1, 12, 17]
    with torch.inference_mode():
        tiny_model.set_attn_implementation("eager")
        padded_eager = tiny_model(input_ids, attention_mask=attention_mask)
        packed_eager = tiny_model(packed_ids, window_lengths=lengths)
        tiny_model.set_attn_implementation("triton")
        padded_triton = tiny_model(input_ids, attention_mask=attention_mask)
        packed_triton = tiny_model(packed_ids, window_lengths=lengths)
    for eager, triton in ((padded_eager, padded_triton), (packed_eager, packed_triton)):
        assert max_diff(eager.start_logits, triton.start_logits) <= FP32_TOLERANCE
        assert max_diff(eager.end_logits, triton.end_logits) <= FP32_TOLERANCE


@pytest.mark.usefixtures("in_the_interpreter")
def test_pipeline_with_the_triton_core_gives_the_eager_answers(tmp_path):
    """QuestionAnswerer(attn_implementation="triton"): packed windows of several lengths (a context cut
    into overlapping windows of at most 48 tokens, and short pairs) give the eager pipeline's answers."""
    from conftest import save_reference_checkpoint, write_tokenizer_files

    from distilqa import QuestionAnswerer

    config = dict(dim=128, n_layers=1, n_heads=2, hidden_dim=256)
    directory = write_tokenizer_files(save_reference_checkpoint(tmp_path, seed=1, span_head_sharpness=20.0, **config))
    long_context = "The river flows north through the city. " * 6 + "Paris is the capital of France."
    questions = ["What is the capital of France?", "Where does the river flow?", "Who won?"]
    contexts = [long_context, "The river flows north.", "Denver won the Super Bowl."]
    answers = {}
    for core in ("eager", "triton"):
        qa = QuestionAnswerer.from_pretrained(directory, attn_implementation=core, batch_size=4)
        answers[core] = qa(questions, contexts, top_k=2, max_seq_len=48, doc_stride=16)
    for eager, triton in zip(answers["eager"], answers["triton"]):
        assert [(a["answer"], a["start"], a["end"]) for a in eager] == [
            (a["answer"], a["start"], a["end"]) for a in triton
        ]
        assert [a["score"] for a in triton] == pytest.approx([a["score"] for a in eager], rel=5e-6)  # measured 5.5e-7


# -- errors -------------------------------------------------------------------------------------------


@pytest.mark.usefixtures("outside_the_interpreter")
def test_cpu_tensors_outside_the_interpreter_say_what_to_do():
    q, k, v = random_qkv(batch=1, heads=1, seq=4)
    with pytest.raises(ValueError, match=r"CUDA tensors.*attn_implementation='sdpa'.*TRITON_INTERPRET=1"):
        flash_attention(q, k, v)


@pytest.mark.usefixtures("in_the_interpreter")
def test_bad_inputs_are_refused_clearly():
    q, k, v = random_qkv(batch=2, heads=1, seq=4)
    with pytest.raises(ValueError, match="head_dim in"):
        flash_attention(*(t[..., :48] for t in (q, k, v)))
    with pytest.raises(ValueError, match="one dtype"):
        flash_attention(q, k.half(), v)
    with pytest.raises(ValueError, match=r"bool tensor \(batch, seq\)"):
        flash_attention(q, k, v, key_mask=torch.ones(2, 1, 1, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="packed windows need batch 1"):
        flash_attention(q, k, v, cu_seqlens=torch.tensor([0, 2, 4], dtype=torch.int32), max_seqlen=2)
    with pytest.raises(ValueError, match="not both"):
        flash_attention(
            q[:1],
            k[:1],
            v[:1],
            key_mask=torch.ones(1, 4, dtype=torch.bool),
            cu_seqlens=torch.tensor([0, 4], dtype=torch.int32),
            max_seqlen=4,
        )
    with pytest.raises(ValueError, match="no attention dropout"):
        resolve_attention("triton")(q, k, v, None, dropout_p=0.1)


def test_training_with_the_triton_core_is_refused_not_silently_gradient_free():
    """The kernel has no backward: a forward whose result needs gradients must not run (no gradient
    would reach q_lin, k_lin, v_lin); the error names the cores that train. Checked before Triton is
    needed, so it holds in any process."""
    model = DistilBertForQuestionAnswering(
        DistilBertConfig(vocab_size=50, dim=32, n_layers=1, n_heads=2, hidden_dim=64)
    )
    model.set_attn_implementation("triton")
    ids = torch.randint(1, 50, (2, 6))
    with pytest.raises(RuntimeError, match=r"inference-only.*'sdpa' or 'eager'"):
        model(ids, start_positions=torch.tensor([1, 2]), end_positions=torch.tensor([2, 3])).loss.backward()
    head_mask = torch.ones(2, requires_grad=True)  # head importance differentiates through a head mask
    with pytest.raises(RuntimeError, match="inference-only"):
        model.eval()(ids, head_mask=head_mask)


# -- the GPU build, checked without a GPU -------------------------------------------------------------


@pytest.mark.usefixtures("outside_the_interpreter")
@pytest.mark.parametrize("variant", ["key-mask", "packed"])
def test_kernel_compiles_for_hopper_with_tensor_core_instructions(variant):
    """The interpreter does not compile the kernel; this compiles it ahead of time for an sm_90 GPU (no
    GPU needed), at the CUDA launch settings, in bf16, and checks that the matmuls became wgmma."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    # the module, not the function that distilqa.kernels exports under the same name
    module = importlib.import_module("distilqa.kernels.flash_attention")

    kernel = module._kernel(interpret=False)
    signature = {name: "i32" for name in kernel.arg_names}
    signature.update(Q="*bf16", K="*bf16", V="*bf16", Out="*bf16", key_mask="*u8", cu_seqlens="*i32")
    signature["scale_log2"] = "fp32"
    constants = dict(
        PADDING=module.PADDING_SCORE,
        HEAD_DIM=64,
        BLOCK_M=module.CUDA_BLOCK_M,
        BLOCK_N=module.CUDA_BLOCK_N,
        HAS_KEY_MASK=variant == "key-mask",
        VARLEN=variant == "packed",
        DOT_PRECISION="tf32",
        DOT_IN_FP32=False,
    )
    signature.update(dict.fromkeys(constants, "constexpr"))
    compiled = triton.compile(
        ASTSource(kernel, signature, constants),
        target=GPUTarget("cuda", 90, 32),
        options=dict(num_warps=8, num_stages=module.CUDA_NUM_STAGES),
    )
    assert "wgmma.mma_async" in compiled.asm["ptx"], "Hopper's warpgroup matrix instructions"
    assert compiled.asm["cubin"]
