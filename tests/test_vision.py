"""The PE-lang tower, downsamplers and projector against a plain re-derivation of the published equations,
and the merge of image rows into the token embeddings."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from stepserve.layers.attention import build_context, forward_context
from stepserve.loader import load_model
from stepserve.models.perception_encoder import DEFAULT_OPTIONS, VisionOptions
from stepserve.testing import attach_kv_cache

# float32 everywhere; the reference differs only in summation order (explicit loops vs fused kernels).
ATOL, RTOL = 1e-4, 1e-4


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return load_model(tiny_model_dir, torch.float32, "cpu")


@pytest.fixture(scope="module")
def weights(tiny_model_dir):
    state = {}
    for shard in sorted(tiny_model_dir.glob("*.safetensors")):
        state |= {k: v.float() for k, v in load_file(shard).items()}
    return state


@pytest.fixture(scope="module")
def config(tiny_model_dir):
    return json.loads((tiny_model_dir / "config.json").read_text())


def layer_norm(x, w, b, eps):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * w + b


def bilinear_matrix(src: int, dst: int) -> torch.Tensor:
    """Rows of weights that resample `src` samples to `dst` (half-pixel centers, edge clamped, no antialias)."""
    m = torch.zeros(dst, src)
    for i in range(dst):
        s = max((i + 0.5) * src / dst - 0.5, 0.0)
        i0 = int(math.floor(s))
        i1 = min(i0 + 1, src - 1)
        m[i, i0] += 1 - (s - i0)
        m[i, i1] += s - i0
    return m


def rope_2d(x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, theta: float) -> torch.Tensor:
    """x [N, D]: pair j of the first half turns by col * f_j, pair j of the second half by row * f_j."""
    d = x.shape[1]
    half = d // 2
    out = x.clone()
    for j in range(half // 2):
        freq = theta ** (-2 * j / half)
        for base, pos in ((0, cols), (half, rows)):
            a, b = x[:, base + 2 * j], x[:, base + 2 * j + 1]
            cos, sin = torch.cos(pos * freq), torch.sin(pos * freq)
            out[:, base + 2 * j] = a * cos - b * sin
            out[:, base + 2 * j + 1] = b * cos + a * sin
    return out


def reference_features(image: torch.Tensor, w: dict, cfg: dict) -> torch.Tensor:
    """One normalized image [3, S, S] -> its projected rows [(S / 56)^2, hidden]."""
    v = cfg["vision_config"]
    p, width, heads, eps = v["patch_size"], v["width"], v["heads"], v["layer_norm_eps"]
    hd, trained = width // heads, v["image_size"] // p
    g = image.shape[-1] // p
    patches = torch.stack([image[:, r * p:(r + 1) * p, c * p:(c + 1) * p].reshape(-1)
                           for r in range(g) for c in range(g)])
    x = patches @ w["vision_model.conv1.weight"].reshape(width, -1).T
    pos = w["vision_model.positional_embedding"].reshape(trained, trained, width)
    m = bilinear_matrix(trained, g)
    x = x + torch.einsum("iy,jx,yxc->ijc", m, m, pos).reshape(g * g, width)
    x = layer_norm(x, w["vision_model.ln_pre.weight"], w["vision_model.ln_pre.bias"], eps)
    idx = torch.arange(g * g, dtype=torch.float32)
    rows, cols = torch.div(idx, g, rounding_mode="floor"), idx % g
    for i in range(v["layers"]):
        b = lambda name: w[f"vision_model.transformer.resblocks.{i}.{name}"]  # noqa: E731
        h = layer_norm(x, b("ln_1.weight"), b("ln_1.bias"), eps)
        qkv = h @ b("attn.in_proj_weight").T + b("attn.in_proj_bias")
        outs = []
        for head in range(heads):
            q, k, val = (qkv[:, part * width + head * hd: part * width + (head + 1) * hd] for part in range(3))
            q, k = rope_2d(q, rows, cols, 10000.0), rope_2d(k, rows, cols, 10000.0)
            outs.append(torch.softmax(q @ k.T / math.sqrt(hd), dim=-1) @ val)
        attn = torch.cat(outs, dim=1) @ b("attn.out_proj.weight").T + b("attn.out_proj.bias")
        x = x + b("ls_1.gamma") * attn
        h = layer_norm(x, b("ln_2.weight"), b("ln_2.bias"), eps)
        h = h @ b("mlp.c_fc.weight").T + b("mlp.c_fc.bias")
        h = h * torch.sigmoid(1.702 * h)
        x = x + b("ls_2.gamma") * (h @ b("mlp.c_proj.weight").T + b("mlp.c_proj.bias"))
    grid = torch.zeros(width, g, g)
    for r in range(g):
        for c in range(g):
            grid[:, r, c] = x[r * g + c]
    y = F.conv2d(grid[None], w["vision_model.vit_downsampler1.weight"], w["vision_model.vit_downsampler1.bias"],
                 stride=2, padding=1)
    y = F.conv2d(y, w["vision_model.vit_downsampler2.weight"], w["vision_model.vit_downsampler2.bias"],
                 stride=2, padding=1)[0]
    n = y.shape[-1]
    rows_out = torch.stack([y[:, r, c] for r in range(n) for c in range(n)])
    return rows_out @ w["vit_large_projector.weight"].T


def images(n: int, size: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def view_and_crop(weights, config):
    """One global view and one crop with their reference rows."""
    view, crop = images(1, 728, seed=0), images(1, 504, seed=1)
    return view, crop, reference_features(crop[0], weights, config), reference_features(view[0], weights, config)


@pytest.fixture
def configured(model):
    """The model's tower, put back to the default options after the test."""
    yield model.vision_model
    model.vision_model.configure(DEFAULT_OPTIONS)


# Every way of running the tower computes the same function. On CPU the attention choice only picks the
# per-resolution loop ("math") or the packed path ("varlen" falls back to it); the CUDA kernels behind them
# are compared on the GPU by benchmarks/vision_tower.py --sweep.
OPTIONS = [
    DEFAULT_OPTIONS,
    VisionOptions(patch_embed="conv", channels_last=False),
    VisionOptions(packed=True, attention="math"),
    VisionOptions(packed=True, attention="varlen", patch_embed="conv"),
    VisionOptions(attention="fa4"),
]


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: f"{o.attention}-packed{int(o.packed)}-{o.patch_embed}"
                                                          f"-cl{int(o.channels_last)}")
def test_global_view_and_crop_match_reference(model, configured, view_and_crop, config, options):
    view, crop, want_crop, want_view = view_and_crop
    configured.configure(options)
    with torch.inference_mode():
        (got,) = model.encode_images(view, crop, [1])
    assert got.shape == (81 + 169, config["text_config"]["hidden_size"])
    assert want_view.std() > 0.1
    torch.testing.assert_close(got[:81], want_crop, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(got[81:], want_view, atol=ATOL, rtol=RTOL)


def test_bf16_rope_is_within_bf16_rounding(model, configured, view_and_crop):
    view, crop, want_crop, _ = view_and_crop
    configured.configure(VisionOptions(rope_dtype=torch.bfloat16))
    with torch.inference_mode():
        (got,) = model.encode_images(view, crop, [1])
    assert float((got[:81] - want_crop).norm() / want_crop.norm()) < 1e-2


def test_compiled_blocks_share_one_graph_and_match_eager(model, configured):
    """The blocks trace through the attention op (its fake shape) as one graph for every resolution and batch;
    packed, a batch of one resolution (one group: dynamo specializes a size-1 dim) is the only second graph."""
    from torch._dynamo.utils import counters

    views, crops = images(2, 728, seed=6), images(3, 504, seed=7)
    with torch.inference_mode():
        want = model.encode_images(views, crops, [2, 1])
        torch._dynamo.reset()
        counters.clear()
        configured.compile_blocks(backend="aot_eager")
        got = model.encode_images(views, crops, [2, 1])
        model.encode_images(views[:1], None, [0])
    torch._dynamo.reset()
    graphs = 2 if configured.options.packed else 1
    assert counters["stats"]["unique_graphs"] == graphs and not counters["graph_break"]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("added", [False, True])
def test_attention_ops_attend_within_each_sequence(added):
    """`vision_attention` (its output, for a quantized out_proj to run after it) and `vision_attention_add_` (each
    group projected by plain weights straight into its rows of the stream, added to them) against per-sequence
    softmax attention."""
    from stepserve.models.perception_encoder import vision_attention, vision_attention_add_

    g = torch.Generator().manual_seed(0)
    heads, dim = 2, 8
    groups = torch.tensor([[1, 6], [3, 4]])  # one sequence of 6 tokens, then three of 4
    q, k, v = (torch.randn(18, heads, dim, generator=g) for _ in range(3))
    rows = []
    for a, e in zip([0, 6, 10, 14], [6, 10, 14, 18]):
        p = torch.softmax(torch.einsum("qhd,khd->hqk", q[a:e], k[a:e]) * dim ** -0.5, dim=-1)
        rows.append(torch.einsum("hqk,khd->qhd", p, v[a:e]).reshape(e - a, heads * dim))
    want = torch.cat(rows)
    if added:
        weight, stream = torch.randn(5, heads * dim, generator=g), torch.randn(18, 5, generator=g)
        want, got = stream + want @ weight.T, stream.clone()
        assert vision_attention_add_(q, k, v, groups, None, "math", weight, got) is None
    else:
        got = vision_attention(q, k, v, groups, None, "math")
    torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)


def test_folded_layer_scales_hold_the_biases_back(model, weights):
    """After loading, each out_proj / c_proj holds its layer scale in its rows and a zero bias; the blocks' shifts are
    the running sums of the biases gamma * b the stream holds back; folding twice is refused."""
    tower = model.vision_model
    pre = "vision_model.transformer.resblocks"
    shift = torch.zeros(tower.cfg.width)
    for i, block in enumerate(tower.transformer.resblocks):
        torch.testing.assert_close(block.shift_1, shift)
        for linear, name, ls in ((block.attn.out_proj, "attn.out_proj", "ls_1"), (block.mlp.c_proj, "mlp.c_proj", "ls_2")):
            gamma = weights[f"{pre}.{i}.{ls}.gamma"]
            assert not linear.bias.any()
            torch.testing.assert_close(linear.weight, gamma[:, None] * weights[f"{pre}.{i}.{name}.weight"])
            shift = shift + gamma * weights[f"{pre}.{i}.{name}.bias"]
            if ls == "ls_1":
                torch.testing.assert_close(block.shift_2, shift)
    torch.testing.assert_close(tower.shift_out, shift)
    with pytest.raises(RuntimeError, match="already folded"):
        tower.fold_layer_scales()


def test_auto_attention_takes_flash_attention4_where_it_runs(model, configured, view_and_crop, monkeypatch):
    """"auto" resolves to "fa4" where the package and GPU allow it and the activations are bf16 or fp16, else
    stays torch's choice; "fa4" asked for on a GPU where it cannot run is refused by name. "fa4" launches once
    over all sequences (cu_seqlens at each one's start); on CPU the op falls back to SDPA, so the output is the
    reference's."""
    from stepserve.layers import flash_attention4
    from stepserve.models import perception_encoder

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert not flash_attention4.available(cpu)
    assert configured.attention_backend(cpu, torch.bfloat16) == "auto"
    monkeypatch.setattr(flash_attention4, "available", lambda device: True)
    assert configured.attention_backend(cuda, torch.bfloat16) == "fa4"
    assert configured.attention_backend(cuda, torch.float32) == "auto"
    configured.configure(VisionOptions(attention="cudnn"))
    assert configured.attention_backend(cuda, torch.bfloat16) == "cudnn"
    configured.configure(VisionOptions(attention="fa4"))
    with pytest.raises(RuntimeError, match="bf16 or fp16"):
        configured.attention_backend(cuda, torch.float32)
    monkeypatch.setattr(flash_attention4, "available", lambda device: False)
    with pytest.raises(RuntimeError, match="flash-attn-4"):
        configured.attention_backend(cuda, torch.bfloat16)

    seen = []
    op = perception_encoder.vision_attention_add_

    def spy(q, k, v, groups, cu_seqlens, backend, *rest):
        seen.append((backend, None if cu_seqlens is None else cu_seqlens.tolist()))
        return op(q, k, v, groups, cu_seqlens, backend, *rest)

    monkeypatch.setattr(perception_encoder, "vision_attention_add_", spy)
    view, crop, want_crop, want_view = view_and_crop
    with torch.inference_mode():
        (got,) = model.encode_images(view, crop, [1])
    grid, crop_grid = 728 // 14, 504 // 14
    assert seen[-1] == ("fa4", [0, grid * grid, grid * grid + crop_grid * crop_grid])
    torch.testing.assert_close(got[:81], want_crop, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(got[81:], want_view, atol=ATOL, rtol=RTOL)


def test_unknown_options_are_refused():
    with pytest.raises(ValueError, match="attention"):
        VisionOptions(attention="fa9")
    with pytest.raises(ValueError, match="patch_embed"):
        VisionOptions(patch_embed="linear")


def test_images_with_different_crop_counts_keep_their_order(model):
    views, crops = images(3, 728, seed=2), images(3, 504, seed=3)
    with torch.inference_mode():
        got = model.encode_images(views, crops, [2, 0, 1])
        view_rows = [model.encode_images(views[i:i + 1], None, [0])[0] for i in range(3)]
        crop_rows = [model.encode_images(views[:1], crops[j:j + 1], [1])[0][:81] for j in range(3)]
    assert [t.shape[0] for t in got] == [2 * 81 + 169, 169, 81 + 169]
    torch.testing.assert_close(got[0], torch.cat([crop_rows[0], crop_rows[1], view_rows[0]]), atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(got[1], view_rows[1], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(got[2], torch.cat([crop_rows[2], view_rows[2]]), atol=ATOL, rtol=RTOL)


def test_num_crops_must_match_the_tensors(model):
    with pytest.raises(ValueError, match="num_crops"):
        model.encode_images(images(1, 728, 0), images(2, 504, 0), [1])


def test_image_rows_replace_the_image_tokens_in_order(model, tiny_model_dir):
    from stepserve.loader import load_tokenizer

    im = model.image_token_id
    assert load_tokenizer(tiny_model_dir).convert_tokens_to_ids("<im_patch>") == im
    # One image with two crops (layout as the processor expands it; the markers are ordinary tokens here).
    ids = [11, 12] + ([3] + [im] * 81 + [4]) * 2 + [5] + [im] * 169 + [6] + [13, 14]
    views, crops = images(1, 728, seed=4), images(2, 504, seed=5)
    input_ids = torch.tensor(ids)
    mask = input_ids == im
    with torch.inference_mode():
        (rows,) = model.encode_images(views, crops, [2])
        embeds = model.get_input_embeddings(input_ids, rows, mask)
        text = model.model.embed_tokens(input_ids)
    k = 0
    for t, token in enumerate(ids):
        if token == im:
            torch.testing.assert_close(embeds[t], rows[k], atol=0, rtol=0)
            k += 1
        else:
            torch.testing.assert_close(embeds[t], text[t], atol=0, rtol=0)
    assert k == rows.shape[0]
    # forward() runs the decoder over exactly these embeddings.
    attach_kv_cache(model, 128, 16)
    positions = torch.arange(len(ids))
    with torch.inference_mode():
        with forward_context(build_context([len(ids)], [len(ids)], [list(range(1, 28))], 16)):
            got = model(input_ids, positions, rows, mask)
        with forward_context(build_context([len(ids)], [len(ids)], [list(range(30, 57))], 16)):
            want = model.model(positions, embeds)
    torch.testing.assert_close(got, want, atol=0, rtol=0)
