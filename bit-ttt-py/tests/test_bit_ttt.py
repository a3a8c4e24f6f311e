"""The Python module against the command line: the same model, the same numbers.

A tiny model is trained once per session by the `bit-ttt-train` binary (from $BIT_TTT_TRAIN,
else target/debug/bit-ttt-train or target/release/bit-ttt-train; the suite fails, not
skips, when there is none). Run: `pytest bit-ttt-py/tests` after `maturin develop`.
"""

import math
import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import bit_ttt

ROOT = Path(__file__).resolve().parents[2]
BOOK = ROOT / "data" / "moby_dick.txt"


def train_binary() -> Path:
    candidates = [os.environ.get("BIT_TTT_TRAIN")] + [
        str(ROOT / "target" / p / "bit-ttt-train") for p in ("debug", "release")
    ]
    for c in candidates:
        if c and Path(c).is_file():
            return Path(c)
    raise RuntimeError(
        "no bit-ttt-train binary: build it (cargo build -p bit-ttt-train) or set BIT_TTT_TRAIN"
    )


def cli(*args: str) -> str:
    done = subprocess.run(
        [str(train_binary()), *args], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, f"{args}: {done.stderr}"
    return done.stdout


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory) -> Path:
    """A tiny TTT-Linear model trained for a few steps on the start of the book."""
    tmp = tmp_path_factory.mktemp("run")
    text = tmp / "train.txt"
    text.write_text(BOOK.read_text(encoding="utf-8")[:40_000], encoding="utf-8")
    out = tmp / "run"
    cli("train", "--out", str(out), "--data", str(text), *TINY_ARGS)
    return out


# The tiny run's settings, as command-line flags and as `bit_ttt.train` keywords.
TINY = dict(mixer="ttt_linear", preset="tiny", seq_len=32, batch_size=4, vocab_size=300,
            steps=6, eval_every=3, progress="quiet")
TINY_ARGS = [a for k, v in TINY.items() for a in ("--" + k.replace("_", "-"), str(v))]


@pytest.fixture(scope="session")
def model(run_dir) -> "bit_ttt.BitLlama":
    return bit_ttt.BitLlama.load(run_dir)


@pytest.fixture(scope="session")
def held_out(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("eval") / "eval.txt"
    path.write_text(BOOK.read_text(encoding="utf-8")[100_000:104_000], encoding="utf-8")
    return path


def test_load_gives_config_tokenizer_and_engine(model, run_dir):
    assert model.engine == "fused" and model.device == "cpu"
    config = model.config
    assert config["n_layers"] == 2 and config["vocab_size"] == model.vocab_size
    assert model.tokenizer is not None and model.tokenizer.vocab_size <= model.vocab_size
    assert "BitLlama(2 blocks" in repr(model)


def test_forward_equals_the_cli_eval(model, run_dir, held_out):
    """Cross-entropy from `forward`'s logits over eval's windows equals `eval`'s number
    (eval runs Burn's batched forward, forward the fused decoder: they agree to rounding)."""
    seq_len = 32
    printed = cli(
        "eval", "--model", str(run_dir), "--data", str(held_out),
        "--seq-len", str(seq_len), "--batch-size", "4",
    )
    expected = float(re.search(r"cross-entropy ([0-9.]+) nats/token", printed).group(1))
    ids = model.tokenizer.encode(held_out.read_text(encoding="utf-8"))
    assert ids.dtype == np.uint32 and len(ids) > 500
    total, count = 0.0, 0
    for start in range(0, len(ids) - 1, seq_len):
        n = min(seq_len, len(ids) - 1 - start)
        logits = model.forward(ids[start:start + n][None, :])
        assert logits.shape == (1, n, model.vocab_size) and logits.dtype == np.float32
        rows = logits[0].astype(np.float64)
        top = rows.max(axis=1)
        lse = top + np.log(np.exp(rows - top[:, None]).sum(axis=1))
        targets = ids[start + 1:start + n + 1]
        total += float((lse - rows[np.arange(n), targets]).sum())
        count += n
    ours = total / count
    assert abs(ours - expected) < 2e-3, (ours, expected)


def test_forward_batches_rows_independently_and_takes_lists(model):
    rng = np.random.default_rng(1)
    ids = rng.integers(0, model.vocab_size, size=(3, 9), dtype=np.int64)
    batched = model.forward(ids)
    assert batched.shape == (3, 9, model.vocab_size)
    for b in range(3):
        np.testing.assert_array_equal(model.forward(ids[b]), batched[b])
    np.testing.assert_array_equal(model.forward(ids.tolist()), batched)
    np.testing.assert_array_equal(model.forward(ids.astype(np.uint32)), batched)
    # A strided (non-contiguous) uint32 view is copied, with the same result.
    wide = np.zeros((3, 18), dtype=np.uint32)
    wide[:, ::2] = ids
    np.testing.assert_array_equal(model.forward(wide[:, ::2]), batched)


@pytest.mark.parametrize(
    "ids, message",
    [
        (np.zeros((1, 2, 3), dtype=np.uint32), "shape"),
        (np.zeros((0, 4), dtype=np.uint32), "nothing to read"),
        (np.array([], dtype=np.int64), "nothing to read"),
        (np.array([[1, 2, 10**6]]), "out of range"),
        (np.array([1, -1]), "not a token id"),
        (np.array([1.0, 2.0]), "integers"),
        ([[1, 2], [3]], "inhomogeneous"),  # ragged: numpy's own ValueError
        (5, "shape"),
    ],
)
def test_bad_ids_are_value_errors(model, ids, message):
    with pytest.raises(ValueError, match=message):
        model.forward(ids)


def test_generate_with_a_seed_equals_the_cli(model, run_dir):
    prompt = "Call me Ishmael."
    printed = cli(
        "generate", "--model", str(run_dir), "--prompt", prompt, "--max-tokens", "24",
        "--seed", "11", "--temperature", "0.9",
    )
    ours = model.generate(prompt, max_new_tokens=24, seed=11, temperature=0.9)
    assert ours.strip(), "generated nothing"
    assert printed.rstrip("\n") == prompt + ours
    assert ours == "".join(model.stream(prompt, max_new_tokens=24, seed=11, temperature=0.9))
    # Ids work as a prompt too.
    ids = model.tokenizer.encode(prompt)
    assert model.generate(ids, max_new_tokens=24, seed=11, temperature=0.9) == ours


def test_stream_pieces_and_stop_strings(model):
    stream = model.stream("The whale", max_new_tokens=30, temperature=0.0)
    pieces = list(stream)
    assert all(pieces) and stream.tokens_generated <= 30
    text = "".join(pieces)
    assert text == model.generate("The whale", max_new_tokens=30, temperature=0.0)
    if len(text) >= 4:
        stop = text[len(text) // 2:len(text) // 2 + 2]
        cut = model.generate("The whale", max_new_tokens=30, temperature=0.0, stop=[stop])
        assert cut == text[:text.index(stop)]


def test_a_saved_state_continues_exactly(model, tmp_path):
    document = model.tokenizer.encode(BOOK.read_text(encoding="utf-8")[5_000:7_000])
    # A whole number of mini-batches (the tiny preset's 4): the saved state is exact there.
    document = document[: len(document) // 4 * 4]
    state = model.new_state()
    model.read(document, state)
    assert state.position == len(document)
    path = tmp_path / "book.soul"
    state.save(path)
    for restored in (bit_ttt.State.load(path, model), model.load_state(path)):
        assert restored.position == len(document)
        question = model.tokenizer.encode(" Who is Ahab?")
        a = model.read(question, state.copy())
        b = model.read(question, restored)
        np.testing.assert_array_equal(a, b)
    # Generation continues from it the same way.
    one = model.generate(" And", max_new_tokens=10, temperature=0.0, state=state.copy())
    two = model.generate(" And", max_new_tokens=10, temperature=0.0,
                         state=bit_ttt.State.load(path, model))
    assert one == two


def test_bad_arguments_raise_the_right_exceptions(model, run_dir, tmp_path):
    with pytest.raises(FileNotFoundError):
        bit_ttt.BitLlama.load(tmp_path / "nothing")
    with pytest.raises(ValueError, match="unknown device"):
        bit_ttt.BitLlama.load(run_dir, device="tpu")
    with pytest.raises(ValueError, match="n_gpu_layers"):
        bit_ttt.BitLlama.load(run_dir, n_gpu_layers=1)
    with pytest.raises(ValueError, match="n_gpu_layers must be"):
        bit_ttt.BitLlama.load(run_dir, device="wgpu", n_gpu_layers="lots")
    with pytest.raises(ValueError, match="top_p"):
        model.generate("x", top_p=1.5)
    with pytest.raises(ValueError, match="temperature"):
        model.generate("x", temperature=float("nan"))
    with pytest.raises(ValueError, match="empty"):
        model.generate("")
    with pytest.raises(ValueError, match="stop string"):
        model.generate("x", stop=[""])
    with pytest.raises(FileNotFoundError):
        model.load_state(tmp_path / "missing.soul")
    bad = tmp_path / "bad.soul"
    bad.write_bytes(b"not a soul file")
    with pytest.raises(ValueError, match="corrupt"):
        model.load_state(bad)
    with pytest.raises(FileNotFoundError):
        bit_ttt.Tokenizer.load(tmp_path / "missing.json")
    other = bit_ttt.BitLlama.load(run_dir)
    with pytest.raises(ValueError, match="another model"):
        model.read([1, 2], other.new_state())
    with pytest.raises(ValueError, match="another model"):
        model.generate("x", state=other.new_state())
    with pytest.raises(ValueError, match="1-D"):
        model.read([[1, 2]], model.new_state())
    with pytest.raises(ValueError, match="out of range"):
        model.tokenizer.decode([10**6])


def test_the_gil_is_released_while_the_model_computes(model):
    """Another Python thread runs while forward computes (it would stall if the GIL were held)."""
    ids = np.random.default_rng(2).integers(0, model.vocab_size, size=(16, 2048)).astype(np.uint32)
    done = threading.Event()
    ticks = 0

    def work():
        model.forward(ids)
        done.set()

    worker = threading.Thread(target=work)
    started = time.perf_counter()
    worker.start()
    while not done.is_set():
        ticks += 1
        time.sleep(0.001)
    worker.join()
    elapsed = time.perf_counter() - started
    assert elapsed > 0.05, f"forward too quick to tell ({elapsed:.3f} s)"
    # About one tick per millisecond while forward ran.
    assert ticks >= elapsed * 1000 * 0.25, (ticks, elapsed)


def test_packed_files_load_and_agree(model, run_dir, tmp_path):
    packed = tmp_path / "model.packed.safetensors"
    cli("export", "--model", str(run_dir), "--out", str(packed))
    p = bit_ttt.BitLlama.load(packed, tokenizer=run_dir / "tokenizer.json")
    ids = model.tokenizer.encode("It is a way I have of driving off the spleen.")
    a, b = model.forward(ids), p.forward(ids)
    scale = np.abs(a).max()
    assert np.abs(a - b).max() <= 2e-2 * max(scale, 1.0)


def test_wgpu_forward_agrees_with_the_cpu(model, run_dir):
    """On the wgpu device (lavapipe in CI): Burn's ops on the GPU backend, the same logits
    within the GPU tolerance. Fails when wgpu is required (BIT_TTT_REQUIRE_WGPU=1) and absent."""
    try:
        gpu = bit_ttt.BitLlama.load(run_dir, device="wgpu")
    except (ValueError, RuntimeError) as e:
        if os.environ.get("BIT_TTT_REQUIRE_WGPU") == "1":
            raise
        pytest.skip(f"no wgpu here: {e}")
    assert gpu.engine == "burn"
    ids = model.tokenizer.encode("Call me Ishmael. Some years ago")
    a, b = model.forward(ids), gpu.forward(ids)
    assert np.abs(a - b).max() <= 5e-2 * max(np.abs(a).max(), 1.0)
    # A split: one block on wgpu, one on the CPU, same logits.
    packed = run_dir / "model.packed.safetensors"
    if not packed.exists():
        cli("export", "--model", str(run_dir), "--out", str(packed))
    split = bit_ttt.BitLlama.load(packed, device="wgpu", n_gpu_layers=1)
    assert split.engine == "hybrid"
    c = split.forward(ids)
    assert np.abs(a - c).max() <= 5e-2 * max(np.abs(a).max(), 1.0)


def test_train_is_the_cli_trainer_with_the_same_arguments(model, run_dir, tmp_path):
    """`bit_ttt.train(**flags)` trains the model `bit-ttt-train train --flags` trains."""
    text = tmp_path / "train.txt"
    text.write_text(BOOK.read_text(encoding="utf-8")[:40_000], encoding="utf-8")
    out = tmp_path / "py-run"
    assert bit_ttt.train(out=out, data=[text], **TINY) is None
    ours = bit_ttt.BitLlama.load(out)
    ids = model.tokenizer.encode("Call me Ishmael. Some years ago")
    np.testing.assert_array_equal(ours.forward(ids), model.forward(ids))
    assert (out / "metrics.csv").is_file() and (out / "loss.png").is_file()


def test_train_arguments_are_checked_like_the_cli(tmp_path):
    with pytest.raises(ValueError, match="unknown mixer"):
        bit_ttt.train(out=tmp_path / "a", data=[BOOK], mixer="lstm")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        bit_ttt.train(out=tmp_path / "b", data=[tmp_path / "missing.txt"])
    with pytest.raises(ValueError, match="holds no checkpoint"):
        bit_ttt.train(out=tmp_path / "c", resume=True)
    with pytest.raises(ValueError, match="unexpected argument"):
        bit_ttt.train(out=tmp_path / "d", no_such_flag=1)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_ctrl_c_stops_training_with_a_checkpoint_that_resumes(tmp_path):
    text = tmp_path / "train.txt"
    text.write_text(BOOK.read_text(encoding="utf-8")[:40_000], encoding="utf-8")
    out = tmp_path / "long"
    settings = dict(TINY, steps=100_000, checkpoint_every=100_000)
    timer = threading.Timer(3.0, lambda: os.kill(os.getpid(), signal.SIGINT))
    timer.start()
    started = time.perf_counter()
    with pytest.raises(KeyboardInterrupt):
        bit_ttt.train(out=out, data=[text], **settings)
    timer.cancel()
    assert time.perf_counter() - started < 60
    latest = (out / "checkpoints" / "latest").read_text().strip()
    step = int(latest.split("-")[1])
    assert 0 < step < 100_000
    # It continues from there (to a nearby stop, to keep the test short).
    bit_ttt.train(out=out, resume=True, stop_at=step + 2, progress="quiet")
    assert (out / "checkpoints" / f"step-{step + 2:06}").is_dir()
