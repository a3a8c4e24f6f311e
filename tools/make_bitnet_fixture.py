#!/usr/bin/env python3
"""Build the tiny BitNet b1.58 reference fixture in tests/fixtures/bitnet-tiny/.

What it makes
-------------
A deterministic (fixed seeds), randomly initialised, tiny ``BitNetForCausalLM``
(HF transformers model_type "bitnet": vocab 300, hidden 64, intermediate 96,
2 layers, 4 query heads / 2 KV heads, relu2, rms_norm_eps 1e-5, rope_theta 5e5,
tied embeddings, BOS 1 / EOS 2), stored in three equivalent forms, each with
transformers' own outputs for it:

  bf16/              quantization_config {quant_method: bitnet, linear_class: autobitlinear,
                     quantization_mode: online}; every tensor bf16; projection weights are the
                     latent (unquantized) weights, transformers quantizes them at run time
                     (absmean ternary, per tensor).
  packed/            quantization_config {.., linear_class: autobitlinear, quantization_mode: offline};
                     projection weights are the ternary codes packed 4-per-byte (uint8
                     [out/4, in], transformers' `pack_weights` layout: output row i*(out/4)+j lives
                     in bits 2i..2i+1 of packed row j, stored as code+1) plus a bf16
                     `<proj>.weight_scale` of shape [1] holding s = mean|W| (AutoBitLinear
                     MULTIPLIES its output by weight_scale).
  packed-bitlinear/  same codes, but linear_class "bitlinear" (transformers' BitLinear, which
                     DIVIDES its output by weight_scale), so the stored weight_scale is 1/s.

Each folder holds config.json, model.safetensors (tied: no lm_head.weight) and
reference.safetensors with, for k in 0,1,2:
  prompt.{k}    int64  [len]        (lengths 1, 7, 19; all start with BOS=1)
  logits.{k}    f32    [len, 300]   logits of every position, one forward over the whole prompt
  greedy.tokens int64  [32]         32 argmax tokens continuing prompt.2, every step a full
                                    forward over the whole sequence so far (no KV cache)
All references are transformers' outputs of
`BitNetForCausalLM.from_pretrained(folder, dtype=torch.float32)` on CPU, eval, no grad.

Weights: latent projections ~ N(0, 0.05^2), embedding ~ N(0, 0.1^2), every RMSNorm weight
1 + 0.1*N(0,1), drawn from one seeded torch.Generator in a fixed order, then rounded to bf16;
everything (codes, scales) derives from the bf16-rounded values, computed in float32:
  s = max(mean|W|, 1e-5);  codes = round_half_even(W / s).clamp(-1, 1).

How to run
----------
From the repository root:

    python tools/make_bitnet_fixture.py

(needs torch, transformers, safetensors and accelerate — transformers' BitNet quantizer
refuses to load without accelerate). It overwrites tests/fixtures/bitnet-tiny/ and
runs its own checks (asserts that transformers really built AutoBitLinear / BitLinear
modules, that the stored tensors were read as given, and that the three forms' logits
agree within 5e-2).

It was run with: Python 3.11, torch 2.15.0 (CPU), transformers 5.25.0,
safetensors 0.8.0, accelerate 1.16.0, numpy 2.4.6.

torch.compile: transformers' BitNet integration decorates its quantization helpers with
@torch.compile. The script sets TORCHDYNAMO_DISABLE=1 before importing torch so they run
eagerly: the references are plain eager PyTorch float32 numerics, and no C compiler /
inductor toolchain is needed. (With compilation left on, CPU inference gave bit-identical
logits here, but compiling added ~30 s.)

transformers quirk worked around here: see upcast_leftover_bf16() (the offline
autobitlinear form otherwise loads with bf16 norms/embedding despite dtype=float32).
The stds / seeds are the constants below (PROJ_STD, EMBED_STD, NORM_STD, *_SEED).
"""

import os

# Must be set before torch is imported (see the docstring: eager numerics, no inductor).
os.environ["TORCHDYNAMO_DISABLE"] = "1"

import json
import shutil
import sys
import time
from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file, save_file
from transformers import BitNetConfig, BitNetForCausalLM
from transformers.integrations.bitnet import AutoBitLinear, BitLinear
from transformers.integrations.bitnet import pack_weights as hf_pack_weights

REPO_ROOT = Path(__file__).resolve().parent.parent
OUT_DIR = REPO_ROOT / "tests" / "fixtures" / "bitnet-tiny"

WEIGHT_SEED = 20240601
PROJ_STD = 0.05
EMBED_STD = 0.1
NORM_STD = 0.1
PROMPT_SEED = 7
PROMPT_LENGTHS = (1, 7, 19)
GREEDY_PROMPT = 2
GREEDY_NEW_TOKENS = 32
BOS, EOS = 1, 2

CONFIG_KWARGS = dict(
    vocab_size=300,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    hidden_act="relu2",
    rms_norm_eps=1e-5,
    rope_theta=500000.0,
    max_position_embeddings=256,
    tie_word_embeddings=True,
    bos_token_id=BOS,
    eos_token_id=EOS,
    attention_bias=False,
)

FORMS = {
    # folder: (linear_class, quantization_mode)
    "bf16": ("autobitlinear", "online"),
    "packed": ("autobitlinear", "offline"),
    "packed-bitlinear": ("bitlinear", "offline"),
}

PROJ_NAMES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
              "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
NORM_NAMES = ("input_layernorm", "post_attention_layernorm",
              "self_attn.attn_sub_norm", "mlp.ffn_sub_norm")


# --------------------------------------------------------------------------- weights

def draw_latent_weights(cfg):
    """Latent weights in a fixed draw order, rounded to bf16 (the stored form)."""
    g = torch.Generator().manual_seed(WEIGHT_SEED)
    h, inter = cfg["hidden_size"], cfg["intermediate_size"]
    head_dim = h // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * head_dim
    shapes = {
        "self_attn.q_proj": (h, h),
        "self_attn.k_proj": (kv, h),
        "self_attn.v_proj": (kv, h),
        "self_attn.o_proj": (h, h),
        "mlp.gate_proj": (inter, h),
        "mlp.up_proj": (inter, h),
        "mlp.down_proj": (h, inter),
    }
    norm_dims = {
        "input_layernorm": h,
        "post_attention_layernorm": h,
        "self_attn.attn_sub_norm": h,
        "mlp.ffn_sub_norm": inter,
    }

    def normal(shape, std):
        return torch.randn(shape, generator=g, dtype=torch.float32) * std

    w = {}
    w["model.embed_tokens.weight"] = normal((cfg["vocab_size"], h), EMBED_STD)
    for i in range(cfg["num_hidden_layers"]):
        for name in PROJ_NAMES:
            w[f"model.layers.{i}.{name}.weight"] = normal(shapes[name], PROJ_STD)
        for name in NORM_NAMES:
            w[f"model.layers.{i}.{name}.weight"] = 1.0 + normal((norm_dims[name],), NORM_STD)
    w["model.norm.weight"] = 1.0 + normal((h,), NORM_STD)
    return {k: v.to(torch.bfloat16).contiguous() for k, v in w.items()}


def is_proj(name):
    return name.endswith("_proj.weight")


def absmean_ternary(w_bf16):
    """(codes int8 [out,in], s float32 scalar) from the bf16 latent, computed in float32."""
    w = w_bf16.float()
    s = w.abs().mean().clamp(min=1e-5)
    q = w / s
    codes = torch.round(q).clamp(-1, 1)  # torch.round: half to even
    # Report how close any element is to a rounding tie (a reimplementation that rounds
    # half away from zero, or computes w * (1/s), could only differ there).
    frac = (q.abs() - q.abs().floor() - 0.5).abs()
    return codes.to(torch.int8), s, float(frac.min())


def pack_codes(codes):
    """uint8 [out/4, in]: output row i*(out/4)+j in bits 2i..2i+1 of packed row j, as code+1."""
    out, _ = codes.shape
    assert out % 4 == 0
    rows = out // 4
    u = (codes.to(torch.int16) + 1).to(torch.uint8)
    packed = torch.zeros((rows, codes.shape[1]), dtype=torch.uint8)
    for i in range(4):
        packed |= u[i * rows:(i + 1) * rows] << (2 * i)
    return packed


# --------------------------------------------------------------------------- config

def config_dict(linear_class, mode):
    cfg = BitNetConfig(**CONFIG_KWARGS)
    d = json.loads(cfg.to_json_string(use_diff=True))
    d["architectures"] = ["BitNetForCausalLM"]
    d["dtype"] = "bfloat16"
    # transformers 5 stores rope_theta only inside "rope_parameters"; also give the flat
    # v4-style key (as in microsoft/bitnet-b1.58-2B-4T) so simpler readers find it.
    d["rope_theta"] = CONFIG_KWARGS["rope_theta"]
    d["quantization_config"] = {
        "quant_method": "bitnet",
        "linear_class": linear_class,
        "quantization_mode": mode,
    }
    return dict(sorted(d.items()))


# --------------------------------------------------------------------------- checks

def upcast_leftover_bf16(model):
    """Work around a transformers 5.25 loading quirk; returns the names it had to cast.

    For an offline "autobitlinear" checkpoint the BitNet quantizer registers its
    deserializer (BitNetDeserialize) as a converter for *every* key ending in "weight",
    and the loader then skips the dtype= cast for all of them (get_new_dtype returns
    None when a converter has a load op). So the embedding and every RMSNorm weight stay
    bf16 although dtype=torch.float32 was asked for, and the first forward fails with
    "expected m1 and m2 to have the same dtype". bf16 -> f32 is exact, so casting these
    leftovers gives exactly the model a correct loader would have built. Only floating
    tensors are touched (BitLinear's packed uint8 weights are left alone).
    """
    cast = []
    with torch.no_grad():
        for name, p in list(model.named_parameters()) + list(model.named_buffers()):
            if p.dtype == torch.bfloat16:
                p.data = p.data.to(torch.float32)
                cast.append(name)
    return cast


def same(a, b):
    """Exact equality including dtype (torch.equal alone promotes dtypes)."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


def check_loaded(model, form, latent, codes, scales, loading_info):
    for key in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
        assert not loading_info.get(key), (form, key, loading_info.get(key))
    linear_class, mode = FORMS[form]
    want = AutoBitLinear if linear_class == "autobitlinear" else BitLinear
    n = 0
    for name, mod in model.named_modules():
        if name.endswith("_proj"):
            assert type(mod) is want, (form, name, type(mod))
            key = f"{name}.weight"
            if form == "bf16":
                assert mod.online_quant
                assert same(mod.weight.data, latent[key].float()), (form, key)
            elif form == "packed":
                assert not mod.online_quant
                assert same(mod.weight.data, codes[key].float()), (form, key)
                ws = scales[key].to(torch.bfloat16).float()
                assert same(mod.weight_scale.data, ws.reshape(1)), (form, key)
            else:
                assert mod.weight.dtype == torch.uint8, (form, key, mod.weight.dtype)
                assert same(mod.weight.data, pack_codes(codes[key])), (form, key)
                assert mod.dtype == torch.float32, (form, key, mod.dtype)
                ws = (1.0 / scales[key]).to(torch.bfloat16).float()
                assert same(mod.weight_scale.data, ws.reshape(1)), (form, key)
            n += 1
    assert n == 7 * CONFIG_KWARGS["num_hidden_layers"], (form, n)
    # lm_head stays a plain Linear tied to the embedding.
    assert type(model.lm_head) is torch.nn.Linear, type(model.lm_head)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    sd = model.state_dict()
    for k, v in latent.items():
        if not is_proj(k):
            assert same(sd[k], v.float()), (form, k, sd[k].dtype)
    for k, v in sd.items():
        assert v.dtype in (torch.float32, torch.uint8), (form, k, v.dtype)
    assert model.config.rope_parameters["rope_theta"] == CONFIG_KWARGS["rope_theta"]


# --------------------------------------------------------------------------- main

def main():
    t0 = time.time()
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True)

    latent = draw_latent_weights(CONFIG_KWARGS)
    codes, scales, min_tie_dist = {}, {}, 1.0
    for k, v in latent.items():
        if is_proj(k):
            codes[k], scales[k], d = absmean_ternary(v)
            min_tie_dist = min(min_tie_dist, d)
            # Cross-check the packing against transformers' own pack_weights.
            ref = hf_pack_weights(codes[k].to(torch.float32).clone())
            assert same(pack_codes(codes[k]), ref), k
            # And the codes against transformers' online WeightQuant formula (w * (1/s)).
            wf = v.float()
            inv = 1.0 / wf.abs().mean().clamp(min=1e-5)
            assert torch.equal((wf * inv).round().clamp(-1, 1), codes[k].float()), k

    pg = torch.Generator().manual_seed(PROMPT_SEED)
    prompts = []
    for n in PROMPT_LENGTHS:
        rest = torch.randint(3, CONFIG_KWARGS["vocab_size"], (n - 1,), generator=pg, dtype=torch.int64)
        prompts.append(torch.cat([torch.tensor([BOS], dtype=torch.int64), rest]))

    if OUT_DIR.exists():
        shutil.rmtree(OUT_DIR)
    OUT_DIR.mkdir(parents=True)

    results, loader_notes, exact_scale_logits = {}, {}, {}
    for form, (linear_class, mode) in FORMS.items():
        folder = OUT_DIR / form
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(config_dict(linear_class, mode), indent=2) + "\n")
        tensors = {}
        for k, v in latent.items():
            if form == "bf16" or not is_proj(k):
                tensors[k] = v
            else:
                tensors[k] = pack_codes(codes[k])
                s = scales[k] if linear_class == "autobitlinear" else 1.0 / scales[k]
                tensors[k[: -len("weight")] + "weight_scale"] = s.reshape(1).to(torch.bfloat16)
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})

        model, info = BitNetForCausalLM.from_pretrained(
            str(folder), dtype=torch.float32, output_loading_info=True)
        model.eval()
        recast = upcast_leftover_bf16(model)
        if recast:
            loader_notes[form] = f"{len(recast)} bf16 tensors left by the loader, cast to f32: {recast[:3]}..."
        check_loaded(model, form, latent, codes, scales, info)

        ref = {}
        with torch.no_grad():
            for i, p in enumerate(prompts):
                logits = model(input_ids=p[None, :], use_cache=False).logits[0]
                assert logits.shape == (len(p), CONFIG_KWARGS["vocab_size"])
                ref[f"prompt.{i}"] = p.clone()
                ref[f"logits.{i}"] = logits.float().contiguous()
            seq = prompts[GREEDY_PROMPT].clone()
            new = []
            for _ in range(GREEDY_NEW_TOKENS):
                logits = model(input_ids=seq[None, :], use_cache=False).logits[0, -1]
                nxt = int(torch.argmax(logits))
                new.append(nxt)
                seq = torch.cat([seq, torch.tensor([nxt], dtype=torch.int64)])
            ref["greedy.tokens"] = torch.tensor(new, dtype=torch.int64)
        save_file(ref, str(folder / "reference.safetensors"), metadata={"format": "pt"})
        # Round trip.
        back = load_file(str(folder / "reference.safetensors"))
        assert all(same(back[k], ref[k]) for k in ref)
        results[form] = ref

        # Equivalence check. The stored weight_scale is bf16, so the packed forms differ from
        # the online form by the bf16 rounding of s (or 1/s), up to 2^-9 relative, and with
        # logits that is a few percent of the largest. To show that codes, packing and scale
        # direction are right, put the exact f32 scale into the *loaded* modules and require
        # agreement with the bf16/ (online) references to float round-off.
        if form != "bf16":
            with torch.no_grad():
                for name, mod in model.named_modules():
                    if name.endswith("_proj"):
                        s = scales[f"{name}.weight"]
                        exact = s if linear_class == "autobitlinear" else 1.0 / s
                        mod.weight_scale.data = exact.reshape(1).to(torch.float32)
                exact_scale_logits[form] = [model(input_ids=p[None, :], use_cache=False).logits[0]
                                            for p in prompts]

    report = {"min_distance_of_W/s_from_a_rounding_tie": min_tie_dist}
    # (1) exact-scale equivalence with the online form.
    for form, logits in exact_scale_logits.items():
        diff = max(float((l - results["bf16"][f"logits.{i}"]).abs().max()) for i, l in enumerate(logits))
        report[f"max|logits bf16 - {form} with exact f32 scale|"] = diff
        assert diff < 1e-4, (form, diff)
    # (2) the stored references: they differ only by the bf16 rounding of the scale.
    forms = list(FORMS)
    for i in range(len(PROMPT_LENGTHS)):
        report[f"max|logits.{i}| ({forms[0]})"] = float(results[forms[0]][f"logits.{i}"].abs().max())
    for a in range(len(forms)):
        for b in range(a + 1, len(forms)):
            fa, fb = forms[a], forms[b]
            diff = max(float((results[fa][f"logits.{i}"] - results[fb][f"logits.{i}"]).abs().max())
                       for i in range(len(PROMPT_LENGTHS)))
            report[f"max|logits {fa} - {fb}|"] = diff
            # Loose on purpose: a bf16 scale is rounded by up to 2^-9 per projection, 14 of them
            # in a row; (1) above is the exact check. 5% of the largest logit.
            bound = 0.05 * max(float(results[fa][f"logits.{i}"].abs().max())
                               for i in range(len(PROMPT_LENGTHS)))
            assert diff < bound, (fa, fb, diff, bound)
            report[f"greedy {fa} == {fb}"] = bool(torch.equal(results[fa]["greedy.tokens"],
                                                              results[fb]["greedy.tokens"]))

    for form, note in loader_notes.items():
        report[f"loader note ({form})"] = note
    write_readme(report)
    for k, v in report.items():
        print(f"{k}: {v}")
    print("greedy.tokens (bf16):", results["bf16"]["greedy.tokens"].tolist())
    for p in sorted(OUT_DIR.rglob("*")):
        if p.is_file():
            print(f"{p.stat().st_size:8d}  {p.relative_to(REPO_ROOT)}")
    print(f"total {dir_size(OUT_DIR)} bytes; took {time.time() - t0:.1f} s")


def dir_size(path):
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def write_readme(report):
    body_size = dir_size(OUT_DIR)
    lines = [
        "# bitnet-tiny: transformers reference fixture for BitNet b1.58",
        "",
        "A tiny, randomly initialised (fixed seeds) `BitNetForCausalLM` (HF model_type `bitnet`:",
        "vocab 300, hidden 64, intermediate 96, 2 layers, 4 query / 2 KV heads, `relu2`,",
        "rms_norm_eps 1e-5, rope_theta 500000, tied embeddings, BOS 1, EOS 2) in three",
        "equivalent forms, with the logits and greedy tokens transformers computes for each.",
        "",
        "Made by `python tools/make_bitnet_fixture.py` (from the repo root) with",
        f"torch {torch.__version__.split('+')[0]} (CPU, eager: TORCHDYNAMO_DISABLE=1), "
        f"transformers {transformers.__version__}, Python {sys.version.split()[0]}.",
        "Do not edit by hand; rerun the script (it is deterministic).",
        "",
        "## Folders",
        "",
        "Each has `config.json`, `model.safetensors` (no `lm_head.weight`: tied) and",
        "`reference.safetensors`.",
        "",
        "| folder | quantization_config | projection weights | `*.weight_scale` (bf16, [1]) |",
        "|---|---|---|---|",
        "| `bf16/` | autobitlinear, online | bf16 latent `[out, in]`; quantized at run time | none |",
        "| `packed/` | autobitlinear, offline | uint8 packed codes `[out/4, in]` | **s** (AutoBitLinear multiplies output by it) |",
        "| `packed-bitlinear/` | bitlinear, offline | uint8 packed codes `[out/4, in]` | **1/s** (BitLinear divides output by it) |",
        "",
        "Norms and the embedding are bf16 in every folder. s = max(mean|W|, 1e-5) over the whole",
        "projection tensor, codes = round_half_even(W/s).clamp(-1, 1), computed in f32 from the",
        "bf16 latent W. Packing (transformers `pack_weights`): code+1 of output row `i*(out/4)+j`",
        "sits in bits `2i..2i+1` of packed row `j` (i = 0..3).",
        "",
        "Run-time semantics (transformers): activations are quantized per token to int8,",
        "scale 127/max|x| (clamped ≥1e-5), round, clamp [-128, 127]; no extra RMSNorm inside the",
        "linear layers (`use_rms_norm` false); the sub-norms `attn_sub_norm` (before o_proj) and",
        "`ffn_sub_norm` (before down_proj) are ordinary model RMSNorms.",
        "",
        "## reference.safetensors",
        "",
        "From `BitNetForCausalLM.from_pretrained(folder, dtype=torch.float32)`, eval, no grad, CPU:",
        "",
        "- `prompt.{0,1,2}`: int64, lengths 1, 7, 19, each starting with BOS 1 (`prompt.0` = [1]).",
        "- `logits.{k}`: f32 `[len, 300]`, every position, one forward over the whole prompt.",
        "- `greedy.tokens`: int64 `[32]`, argmax continuation of `prompt.2`, each step a full",
        "  forward over the whole sequence so far (no KV cache).",
        "",
        "## Notes for consumers",
        "",
        "- Each folder's references are transformers' outputs *for that folder*. The packed",
        "  forms use the bf16-rounded scale (s or 1/s, up to 2^-9 relative off the f32 s used",
        "  by the online form), which moves the logits by a few percent of their largest",
        "  between forms. With the exact f32 scale patched in, the packed forms reproduce the `bf16/`",
        "  logits to ~1e-5 (checked by the script): codes, packing and scale direction agree.",
        "- Loading `packed/` (offline autobitlinear) with transformers 5.25 and",
        "  `dtype=torch.float32` leaves the embedding and all RMSNorm weights in bf16 (the",
        "  quantizer's deserializer claims every `*weight` key, which skips the dtype cast), and",
        "  the forward then fails with a dtype mismatch. The script casts those leftovers to f32",
        "  (exact), i.e. the references are those of the intended all-f32 model.",
        "- The embedding's std is 0.1: at 1.0 the tied embedding dominated the residual stream",
        "  and every argmax was the input token. A random model's greedy continuation still",
        "  settles into a repeated token soon; the logits of every position are the strong test.",
        "",
        "## Cross-form agreement (as generated)",
        "",
    ]
    for k, v in report.items():
        lines.append(f"- {k}: {v:.6g}" if isinstance(v, float) else f"- {k}: {v}")
    lines += ["", f"Total size of the data files: {body_size} bytes (plus this README).", ""]
    (OUT_DIR / "README.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
