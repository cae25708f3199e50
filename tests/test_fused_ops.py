"""The hand-written fused operations: chunked LM-head cross-entropy and the expert activations.

Each must compute the same function and the same gradients as the plain torch ops it replaces.
"""

import pytest
import torch
import torch.nn.functional as F

from moe_reason.models import chunked_loss
from moe_reason.models.chunked_loss import linear_cross_entropy
from moe_reason.models.expert_kernels import expert_activation

from conftest import assert_training_path_equals_eval_path, random_ids, tiny_model


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 7 rows (vocabulary 40): several chunks and a short last one."""
    monkeypatch.setitem(chunked_loss.CHUNK_ELEMENTS, "cpu", 7 * 40)


def reference_cross_entropy(hidden, weight, targets, token_weights, use_stablemax=False):
    """Autograd through the logits; stable-max written out from its definition (TRM's s(x))."""
    logits = hidden @ weight.T
    if use_stablemax:
        s = torch.where(logits >= 0, logits + 1, 1 / (1 - torch.minimum(logits, torch.zeros_like(logits))))
        log_probs = torch.log(s / s.sum(-1, keepdim=True))
    else:
        log_probs = F.log_softmax(logits, dim=-1)
    nll = F.nll_loss(log_probs, targets, ignore_index=-100, reduction="none")
    return (nll * token_weights).sum(), nll, (logits.argmax(-1) == targets)


@pytest.mark.parametrize("use_stablemax", [False, True], ids=["softmax", "stablemax"])
def test_chunked_cross_entropy_matches_the_logits_path(small_chunks, use_stablemax):
    T, H, V = 30, 16, 40
    hidden = torch.randn(T, H, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(V, H, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, V, (T,))
    targets[[0, 5, 6, 29]] = -100
    token_weights = torch.rand(T, dtype=torch.float64) * (targets != -100)

    loss, nll, correct = linear_cross_entropy(hidden, weight, targets, token_weights, use_stablemax)
    (2.5 * loss).backward()  # a non-unit incoming gradient is applied to the precomputed ones
    grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    ref_loss, ref_nll, ref_correct = reference_cross_entropy(hidden, weight, targets, token_weights, use_stablemax)
    (2.5 * ref_loss).backward()

    torch.testing.assert_close(loss, ref_loss, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(nll, ref_nll.detach(), atol=1e-12, rtol=1e-12)
    assert torch.equal(correct, ref_correct)
    assert not nll.requires_grad and not correct[targets == -100].any()
    torch.testing.assert_close(grads[0], hidden.grad, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(grads[1], weight.grad, atol=1e-12, rtol=1e-12)

    with torch.no_grad():  # the no-gradient path gives the same figures
        no_grad = linear_cross_entropy(hidden, weight, targets, token_weights, use_stablemax)
    torch.testing.assert_close(no_grad[0], ref_loss.detach(), atol=1e-12, rtol=1e-12)


def test_chunked_cross_entropy_under_bf16_autocast_keeps_fp32_statistics(small_chunks):
    hidden = torch.randn(30, 16, requires_grad=True)
    weight = torch.randn(40, 16, requires_grad=True)
    targets = torch.randint(0, 40, (30,))
    token_weights = torch.full((30,), 1 / 30)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, nll, _ = linear_cross_entropy(hidden, weight, targets, token_weights)
        ref, _, _ = reference_cross_entropy(hidden, weight, targets, token_weights)
    assert loss.dtype == nll.dtype == torch.float32
    torch.testing.assert_close(loss, ref.float(), atol=2e-2, rtol=1e-2)
    grads = torch.autograd.grad(loss, (hidden, weight))
    ref_loss = reference_cross_entropy(hidden, weight, targets, token_weights)[0]
    ref_grads = torch.autograd.grad(ref_loss, (hidden, weight))
    for grad, ref_grad in zip(grads, ref_grads):  # bf16 matmuls, fp32 accumulation and result
        assert grad.dtype == torch.float32
        torch.testing.assert_close(grad, ref_grad, atol=2e-3, rtol=5e-2)


@pytest.mark.parametrize("fields", [{}, {"stablemax_loss": True}, {"stablemax_loss": True, "bidirectional": True,
                                                                    "use_cache": False}],
                         ids=["softmax", "stablemax", "stablemax_grid"])
def test_training_loss_skips_the_logits_and_equals_the_logits_path(small_chunks, fields):
    """Training with labels goes through the chunked loss; eval mode through the logits. With no
    dropout or jitter both compute the same loss and gradients (token mean, ignored labels), with
    either loss."""
    model = tiny_model(vocab_size=40, hidden_dropout=0.0, attention_dropout=0.0, router_jitter_noise=0.0, **fields)
    ids = random_ids(3, 12, vocab=40)
    labels = ids.clone()
    labels[0, :5] = -100
    figures = assert_training_path_equals_eval_path(model, ids, labels)
    with torch.no_grad():  # and the loss is the one asked for
        logits = model.eval()(ids).logits
    targets = labels if model.config.bidirectional else F.pad(labels[:, 1:], (0, 1), value=-100)
    softmax = F.cross_entropy(logits.reshape(-1, 40), targets.reshape(-1), ignore_index=-100)
    assert (abs(figures["lm_loss"] - softmax) > 1e-3) == model.config.stablemax_loss  # near 0, s(x) ~ exp(x)


@pytest.mark.parametrize("gated", [True, False])
def test_expert_activation_matches_autograd_and_refuses_a_second_backward(gated):
    x = torch.randn(37, 24, dtype=torch.float64, requires_grad=True)
    w = torch.randn(24, 48 if gated else 24, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(37, 24, dtype=torch.float64)
    expert_activation(x @ w, gated).backward(grad)
    fused = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    h = x @ w
    gate, up = h.chunk(2, dim=-1)
    (F.silu(gate) * up if gated else F.silu(h)).backward(grad)
    torch.testing.assert_close(fused[0], x.grad, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(fused[1], w.grad, atol=1e-12, rtol=1e-12)

    # the backward reuses h's buffer: a second backward through the graph must fail, not be wrong
    out = expert_activation(x @ w, gated).sum()
    out.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="inplace operation"):
        out.backward()


def test_chunked_gradients_survive_fp16_autocast_with_tiny_token_weights(small_chunks):
    """fp16 autocast relies on loss scaling to keep small gradients representable. The chunked
    loss forms its gradients before the scale is known, so it must keep them in range itself:
    token weights of 1e-6 (a mean over a million tokens) may not flush them to zero."""
    hidden = torch.randn(30, 16, requires_grad=True)
    weight = torch.randn(40, 16, requires_grad=True)
    targets = torch.randint(0, 40, (30,))
    token_weights = torch.full((30,), 1e-6)
    with torch.autocast("cpu", dtype=torch.float16):
        loss, _, _ = linear_cross_entropy(hidden, weight, targets, token_weights)
    (loss * 65536.0).backward()  # what a GradScaler does
    grads = hidden.grad / 65536.0, weight.grad / 65536.0
    hidden.grad = weight.grad = None
    ref, _, _ = reference_cross_entropy(hidden.double(), weight.double(), targets, token_weights.double())
    ref.backward()
    for got, want in zip(grads, (hidden.grad, weight.grad)):
        assert (got - want).abs().max() <= 1e-2 * want.abs().max()


@pytest.mark.parametrize("tie", [True, False])
def test_training_loss_still_works_after_resize_token_embeddings(tie):
    """transformers' resize hands the model a plain nn.Linear head; the chunked loss needs ours."""
    model = tiny_model(tie_word_embeddings=tie, hidden_dropout=0.0, attention_dropout=0.0, router_jitter_noise=0.0)
    model.resize_token_embeddings(300, mean_resizing=False)
    assert model.lm_head.weight.shape == (300, 32)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tie
    ids = random_ids(2, 16, vocab=300)
    train_loss = model.train()(ids, labels=ids).loss
    train_loss.backward()
    assert model.lm_head.weight.grad is not None
    torch.testing.assert_close(train_loss, model.eval()(ids, labels=ids).loss, atol=1e-6, rtol=1e-6)
