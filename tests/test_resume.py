"""Resume: a compression from disk killed at any point (a real SIGKILL to a real process) and started
again with the same command continues after the last finished block and writes byte-identical
shards; a checkpoint of other inputs is refused; resume=False starts over."""

import importlib.util
import json
import pathlib
import random
import signal
import subprocess
import sys
import time

import pytest

from prehab_svd import PrehabError, compress_pretrained
from prehab_svd.io import INDEX_FILE, META_FILE
from prehab_svd.streaming import PROGRESS_FILE, _Checkpoint, checkpoint_dir

CHILD = pathlib.Path(__file__).with_name("_streaming_child.py")
BLOCKS = 6


def _child_module():
    spec = importlib.util.spec_from_file_location("_streaming_child", CHILD)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    from conftest import tiny_model

    d = tmp_path_factory.mktemp("resume-src")
    tiny_model("llama", layers=BLOCKS, hidden=64, intermediate=128).save_pretrained(str(d))
    return d


def command(src, dst, *extra):
    return [sys.executable, str(CHILD), str(src), str(dst), "aa-svd", "0.5", *extra]


def progress(dst):
    path = checkpoint_dir(dst) / PROGRESS_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def weights(folder) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.safetensors"))}


def test_sigkill_then_resume_is_byte_identical(src, tmp_path):
    # Kill once a randomly chosen block is on disk. The child stalls once the block after it is
    # checkpointed, so the kill always lands before the end: during the next block's work, its
    # writes, or the stall.
    target = random.SystemRandom().randrange(BLOCKS - 1)
    ref, dst = tmp_path / "ref", tmp_path / "out"
    uninterrupted = subprocess.Popen(command(src, ref), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)
    victim = subprocess.Popen(command(src, dst, "--stall-after", str(target + 1)),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while (p := progress(dst)) is None or p["next_block"] < target + 1:
        assert victim.poll() is None, f"target {target}: the child ended: {victim.stderr.read()[-3000:]}"
        assert time.monotonic() < deadline, f"target {target}: no progress"
        time.sleep(0.002)
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=60)
    assert victim.returncode == -signal.SIGKILL
    killed_at = progress(dst)["next_block"]
    print(f"target block {target}: killed with blocks 0..{killed_at - 1} checkpointed")
    assert target + 1 <= killed_at <= target + 2, (target, killed_at)
    assert not dst.exists() and checkpoint_dir(dst).is_dir()

    # Other inputs are refused, naming what changed, and the checkpoint is left as it was.
    before = (checkpoint_dir(dst) / PROGRESS_FILE).read_bytes()
    batches = _child_module().calibration()
    with pytest.raises(PrehabError, match=r"other inputs: keep_ratio \(0.5 -> 0.6\)\. Rerun"):
        compress_pretrained(src, dst, "aa-svd", 0.6, batches)
    other = [dict(b, input_ids=b["input_ids"].flip(1)) for b in batches]
    with pytest.raises(PrehabError, match=r"other inputs: calibration .*--no-resume"):
        compress_pretrained(src, dst, "aa-svd", 0.5, other)
    with pytest.raises(PrehabError, match=r"other inputs: method"):
        compress_pretrained(src, dst, "svd-llm", 0.5, batches)
    assert (checkpoint_dir(dst) / PROGRESS_FILE).read_bytes() == before

    _, err = uninterrupted.communicate(timeout=600)
    assert uninterrupted.returncode == 0, err[-3000:]
    resumed = subprocess.run(command(src, dst), capture_output=True, text=True, timeout=600, check=False)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    report = json.loads(resumed.stdout.strip().splitlines()[-1])
    assert report["details"]["resumed_at_block"] == killed_at, (target, killed_at)

    got, want = weights(dst), weights(ref)
    assert len(want) == BLOCKS + 1 and list(got) == list(want)
    for name in want:
        assert got[name] == want[name], f"{name} differs (killed at block {killed_at}, target {target})"
    assert (dst / INDEX_FILE).read_text() == (ref / INDEX_FILE).read_text()
    assert sorted(p.name for p in dst.iterdir()) == sorted(p.name for p in ref.iterdir())
    rows = [json.loads((d / META_FILE).read_text())["report"]["layers"] for d in (dst, ref)]
    assert rows[0] == rows[1]
    assert not checkpoint_dir(dst).exists()


def test_error_then_resume_or_start_over(src, tmp_path, make_batches):
    """In process: an exception after block 1 leaves a checkpoint; resume=True runs only the blocks
    after it, resume=False all of them; a run stopped after the last block only finishes the folder.
    Every output is byte-identical to the uninterrupted one."""
    batches = make_batches(n=2, batch=2, tokens=40)  # 160 tokens: full-rank statistics
    ref = tmp_path / "ref"
    compress_pretrained(src, ref, "svd-llm", 0.5, batches)

    def stop_after(k, seen):
        def on_block(index, blocks):
            seen.append(index)
            if index == k:
                raise KeyboardInterrupt("stopped")
        return on_block

    dst = tmp_path / "out"
    seen = []
    with pytest.raises(KeyboardInterrupt):
        compress_pretrained(src, dst, "svd-llm", 0.5, batches, on_block=stop_after(1, seen))
    part = checkpoint_dir(dst)
    assert seen == [0, 1] and progress(dst)["next_block"] == 2 and not dst.exists()
    assert sorted(p.name for p in part.glob("hidden-*")) == ["hidden-00002.safetensors"]
    assert len(list((part / "model").glob("model-*.safetensors"))) == 3  # outside, block 0, block 1
    # what a kill in the middle of a write leaves behind
    (part / "model" / ".model-00004-of-00007.safetensors.tmp-abc").write_bytes(b"half")
    (part / ".progress.json.tmp-def").write_text("{")

    seen = []
    report = compress_pretrained(src, dst, "svd-llm", 0.5, batches, on_block=stop_after(-1, seen))
    assert seen == list(range(2, BLOCKS)) and report.details["resumed_at_block"] == 2
    assert len(report.layers) == 7 * BLOCKS and weights(dst) == weights(ref)
    assert sorted(p.name for p in dst.iterdir()) == sorted(p.name for p in ref.iterdir())

    dst2 = tmp_path / "out2"
    with pytest.raises(KeyboardInterrupt):
        compress_pretrained(src, dst2, "svd-llm", 0.5, batches, on_block=stop_after(3, []))
    seen = []
    report = compress_pretrained(src, dst2, "svd-llm", 0.5, batches, resume=False,
                                 on_block=stop_after(-1, seen))
    assert seen == list(range(BLOCKS)) and "resumed_at_block" not in report.details
    assert weights(dst2) == weights(ref)

    dst3 = tmp_path / "out3"
    finish = _Checkpoint.finish

    def crash(self, *args, **kwargs):
        raise KeyboardInterrupt("killed while finishing")

    _Checkpoint.finish = crash
    try:
        with pytest.raises(KeyboardInterrupt):
            compress_pretrained(src, dst3, "svd-llm", 0.5, batches)
    finally:
        _Checkpoint.finish = finish
    assert progress(dst3)["next_block"] == BLOCKS and progress(dst3)["hidden"] is None
    seen = []
    report = compress_pretrained(src, dst3, "svd-llm", 0.5, batches, on_block=stop_after(-1, seen))
    assert seen == [] and report.details["resumed_at_block"] == BLOCKS
    assert weights(dst3) == weights(ref)
    assert [(r.name, r.rank) for r in report.layers] == [
        (lay["name"], lay["rank"]) for lay in json.loads((ref / META_FILE).read_text())["report"]["layers"]]
