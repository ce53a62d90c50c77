"""data_prep/prepare.py end to end, against the GPT-2 tokenizer itself as the oracle (the bundled one,
which tests/unit/test_tokenizer.py checks against tiktoken's own)."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np

from gpt2repro import shards
from gpt2repro.tokenizer import gpt2
from tests.distributed.helpers import after_import, env_with_sitecustomize, wait_for

REPO = Path(__file__).resolve().parents[2]
PREPARE = REPO / "data_prep" / "prepare.py"
EOT = 50256
ENC = gpt2()


def run_prepare(*args, check=True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(PREPARE), *map(str, args)], capture_output=True, text=True)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def make_docs(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    words = ["the", "GPT", "naïve", "日本語", "emoji 🙂", "<|endoftext|>", "\n", "  ", "token", "ñ"]
    docs = [" ".join(rng.choice(words, size=int(rng.integers(1, 60)))) for _ in range(n)]
    docs[3] = ""  # an empty document still gets its EOT
    return docs


def write_jsonl(path: Path, docs: list[str], field: str = "text") -> Path:
    path.write_text("".join(json.dumps({field: d, "id": i}) + "\n" for i, d in enumerate(docs)))
    return path


def read_split(out: Path, split: str) -> np.ndarray:
    return np.concatenate([shards.open_tokens(s) for s in shards.find_shards(out)[split]])


def split_docs(tokens: np.ndarray) -> list[list[int]]:
    starts = np.flatnonzero(tokens == EOT).tolist() + [len(tokens)]
    assert starts[0] == 0, "a split must start with EOT"
    return [tokens[a + 1 : b].tolist() for a, b in zip(starts[:-1], starts[1:], strict=True)]


def test_round_trip_shards_and_val_split(tmp_path):
    docs = make_docs(300)
    corpus = write_jsonl(tmp_path / "c.jsonl", docs)
    out = tmp_path / "out"
    run_prepare("--out", out, "--files", corpus, "--shard-tokens", 1000, "--val-docs", 20, "--num-proc", 2)

    manifest = json.loads((out / "manifest.json").read_text())
    val_idx = set(np.random.default_rng(1337).choice(300, size=20, replace=False).tolist())
    expected = {
        s: [ENC.encode_ordinary(d) for i, d in enumerate(docs) if (i in val_idx) == (s == "val")]
        for s in ("train", "val")
    }
    for split in ("train", "val"):
        assert split_docs(read_split(out, split)) == expected[split]  # exact, in order, nothing lost
        info = manifest["splits"][split]
        assert info["num_documents"] == len(expected[split])
        assert info["num_tokens"] == sum(len(d) + 1 for d in expected[split])
        sizes = [e["num_tokens"] for e in info["shards"]]
        assert all(n == 1000 for n in sizes[:-1]) and 0 < sizes[-1] <= 1000  # fixed-size shards
        assert sum(e["num_documents"] for e in info["shards"]) == info["num_documents"]
    assert len(manifest["splits"]["train"]["shards"]) > 3
    assert manifest["tokenizer"] == "gpt2" and manifest["eot_token"] == EOT and manifest["dtype"] == "uint16"
    assert not list(out.glob(".*")), "no state or temp files are left behind"
    assert run_prepare("--verify", out).returncode == 0


def test_single_document_keeps_its_tail_as_val(tmp_path, shakespeare_path):
    out = tmp_path / "shk"
    run_prepare("--out", out, "--files", shakespeare_path)
    text = shakespeare_path.read_text()
    cut = int(0.9 * len(text))
    assert read_split(out, "train").tolist() == [EOT] + ENC.encode_ordinary(text[:cut])
    assert read_split(out, "val").tolist() == [EOT] + ENC.encode_ordinary(text[cut:])


def test_parquet_and_txt_files_load_like_jsonl(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = make_docs(40, seed=1)
    pq.write_table(pa.table({"body": docs[:20]}), tmp_path / "a.parquet")
    write_jsonl(tmp_path / "b.jsonl", docs[20:30], field="body")
    for i, d in enumerate(docs[30:]):
        (tmp_path / f"doc{i}.txt").write_text(d)
    txts = [tmp_path / f"doc{i}.txt" for i in range(10)]
    out = tmp_path / "out"
    run_prepare(
        "--out",
        out,
        "--files",
        tmp_path / "a.parquet",
        tmp_path / "b.jsonl",
        *txts,
        "--text-field",
        "body",
        "--val-docs",
        1,
    )
    got = split_docs(read_split(out, "train")) + split_docs(read_split(out, "val"))
    assert sorted(got) == sorted(ENC.encode_ordinary(d) for d in docs)


# prepare.py sleeps for good right after the state save that first records 3 train shards.
STALL_AFTER_3_TRAIN_SHARDS = after_import(
    "gpt2repro.shards",
    """import json, time
_write_json_atomic = module.write_json_atomic
def write_json_atomic(path, obj, *args, **kwargs):
    result = _write_json_atomic(path, obj, *args, **kwargs)
    if str(path).endswith(".prepare_state.json") and len(obj["shards"]["train"]) >= 3:
        time.sleep(3600)
    return result
module.write_json_atomic = write_json_atomic
""",
)


def recorded_train_shards(state_file: Path) -> int:
    return len(json.loads(state_file.read_text())["shards"]["train"]) if state_file.exists() else 0


def test_resume_after_kill_is_byte_identical(tmp_path):
    corpus = write_jsonl(tmp_path / "c.jsonl", make_docs(6000, seed=2))
    # Many small shards: the kill after shard 2 lands with dozens still to write, far more work
    # than the 10 ms the test takes to see shard 2 and kill.
    args = ["--files", corpus, "--shard-tokens", 4000, "--val-docs", 300, "--num-proc", 1]
    reference = tmp_path / "reference"
    run_prepare("--out", reference, *args)
    n_train_shards = len(list(reference.glob("train_*.bin")))
    assert n_train_shards >= 24

    out = tmp_path / "killed"
    # The run stalls once its state file records 3 train shards, with dozens still to write: the kill
    # lands mid-run however fast the machine.
    stall = env_with_sitecustomize(tmp_path / "stall", STALL_AFTER_3_TRAIN_SHARDS)
    proc = subprocess.Popen(
        [sys.executable, str(PREPARE), "--out", str(out), *map(str, args)],
        env=stall,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_for(lambda: recorded_train_shards(out / ".prepare_state.json") >= 3, timeout=60)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists(), "an interrupted run must not look complete"
    written = len(list(out.glob("train_*.bin")))
    assert 3 <= written < n_train_shards, "the kill should land mid-run"
    # Shards the state file records are kept; any written after its last save are redone.
    state = json.loads((out / ".prepare_state.json").read_text())
    recorded = {e["file"]: (out / e["file"]).stat().st_ino for e in state["shards"]["train"]}

    rerun = run_prepare("--out", out, *args)
    assert "done:" in rerun.stdout
    assert {name: (out / name).stat().st_ino for name in recorded} == recorded, "finished shards are not redone"
    ref_files = sorted(p.name for p in reference.iterdir())
    assert sorted(p.name for p in out.iterdir()) == ref_files
    for name in ref_files:
        if name.endswith(".bin"):
            assert (out / name).read_bytes() == (reference / name).read_bytes(), name


def test_verify_catches_a_flipped_byte(tmp_path):
    corpus = write_jsonl(tmp_path / "c.jsonl", make_docs(100))
    out = tmp_path / "out"
    run_prepare("--out", out, "--files", corpus, "--shard-tokens", 500)
    victim = out / "train_000001.bin"
    data = bytearray(victim.read_bytes())
    data[2000] ^= 0x01
    victim.write_bytes(bytes(data))
    proc = run_prepare("--verify", out, check=False)
    assert proc.returncode != 0
    assert "train_000001.bin" in proc.stderr and "sha256" in proc.stderr


def test_data_prep_never_imports_torch(tmp_path):
    corpus = write_jsonl(tmp_path / "c.jsonl", make_docs(20))
    code = (
        "import sys; from data_prep.prepare import main; "
        f"rc = main(['--out', {str(tmp_path / 'o')!r}, '--files', {str(corpus)!r}, '--num-proc', '1']); "
        "assert rc == 0; assert 'torch' not in sys.modules, 'torch was imported'"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr


def _bad_inputs(tmp_path: Path):
    good = write_jsonl(tmp_path / "good.jsonl", make_docs(10))
    corrupt = tmp_path / "corrupt.jsonl"
    corrupt.write_text('{"text": "fine"}\n{"text": broken\n')
    bad_parquet = tmp_path / "bad.parquet"
    bad_parquet.write_bytes(b"PAR1 this is not parquet")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    other = tmp_path / "other_out"
    run_prepare("--out", other, "--files", good, "--val-docs", 2)
    return {
        "missing file": (["--files", tmp_path / "nope.jsonl"], "does not exist"),
        "corrupt json": (["--files", corrupt], "is not valid JSON"),
        "corrupt parquet": (["--files", bad_parquet], "Could not read"),
        "missing text field": (["--files", good, "--text-field", "content"], "no field 'content'"),
        "empty corpus": (["--files", empty], "no documents"),
        "different dataset in out dir": (
            ["--files", good, "--val-docs", 3, "--out-dir", other],
            "already holds a different prepared dataset",
        ),
    }


def test_bad_inputs_give_one_clear_error(tmp_path):
    for name, (args, message) in _bad_inputs(tmp_path).items():
        args = list(args)
        out = tmp_path / name.replace(" ", "_")
        if "--out-dir" in args:
            i = args.index("--out-dir")
            out = args[i + 1]
            del args[i : i + 2]
        before = {p.name: p.stat().st_mtime_ns for p in Path(out).glob("*")} if Path(out).exists() else {}
        proc = run_prepare("--out", out, *args, check=False)
        assert proc.returncode != 0, name
        assert message in proc.stderr, (name, proc.stderr)
        assert "Traceback" not in proc.stderr, (name, proc.stderr)
        lines = proc.stderr.strip().splitlines()  # progress-bar lines may precede the error
        assert [line for line in lines if "error" in line.lower()] == [lines[-1]], (name, proc.stderr)
        assert lines[-1].startswith("error: "), (name, proc.stderr)
        if not before:
            assert not (Path(out) / "manifest.json").exists(), name
        else:  # the other dataset is untouched
            assert {p.name: p.stat().st_mtime_ns for p in Path(out).glob("*")} == before, name


def test_local_files_read_as_datasets_reads_them(tmp_path):
    """The standard-library reader against datasets' own json and text builders (the oracle)."""
    datasets = __import__("pytest").importorskip("datasets")
    from data_prep.sources import FilesSource

    docs = make_docs(300, seed=5) + ["crlf\r\nline\r\n", "tab\tand unicode: naïve 🤖", ""]
    jsonl = write_jsonl(tmp_path / "a.jsonl", docs)
    array = tmp_path / "b.json"
    array.write_text(json.dumps([{"text": d, "n": i} for i, d in enumerate(docs[:40])]))
    txt = tmp_path / "c.txt"
    txt.write_bytes(b"first line\r\nsecond line\n\nlast, no newline")
    ours = [t for batch in FilesSource((str(jsonl), str(array), str(txt)), "text").iter_texts() for t in batch]
    oracle = list(datasets.load_dataset("json", data_files=[str(jsonl)], split="train")["text"])
    oracle += list(datasets.load_dataset("json", data_files=[str(array)], split="train")["text"])
    oracle += datasets.load_dataset("text", data_files=[str(txt)], split="train", sample_by="document")["text"]
    assert ours == oracle and len(ours) == len(docs) + 40 + 1


def test_local_text_needs_only_the_core_install(tmp_path):
    """prepare.py with datasets (and pyarrow) unimportable: the same shards, byte for byte."""
    corpus = write_jsonl(tmp_path / "c.jsonl", make_docs(400, seed=7))
    txt = tmp_path / "d.txt"
    txt.write_text("A plain text file is one document.\n" * 50)
    args = ["--files", corpus, txt, "--val-docs", 20, "--shard-tokens", 3000]
    run_prepare("--out", tmp_path / "with", *args)
    block = "import runpy, sys; sys.modules.update(datasets=None, pyarrow=None); sys.argv[0] = %r; runpy.run_path(%r, "
    block += "run_name='__main__')"
    cmd = [sys.executable, "-c", block % (str(PREPARE), str(PREPARE)), "--out", str(tmp_path / "without")]
    proc = subprocess.run([*cmd, *map(str, args)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    names = sorted(p.name for p in (tmp_path / "with").glob("*.bin"))
    assert names and names == sorted(p.name for p in (tmp_path / "without").glob("*.bin"))
    for name in names:
        assert (tmp_path / "with" / name).read_bytes() == (tmp_path / "without" / name).read_bytes(), name


def fineweb_parquet(path: Path, docs: list[str]) -> Path:
    """A local file in the schema of HuggingFaceFW/fineweb's sample-10BT parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    n = len(docs)
    table = pa.table(
        {
            "text": docs,
            "id": [f"<urn:uuid:{i:08d}>" for i in range(n)],
            "dump": ["CC-MAIN-2024-10"] * n,
            "url": [f"https://example.com/{i}" for i in range(n)],
            "date": ["2024-02-21T08:30:12Z"] * n,
            "file_path": ["s3://commoncrawl/crawl-data/x.warc.gz"] * n,
            "language": ["en"] * n,
            "language_score": [0.9] * n,
            "token_count": [len(ENC.encode_ordinary(d)) for d in docs],
        }
    )
    pq.write_table(table, path)
    return path


def test_fineweb_splits_off_its_first_tokens_as_val_as_llmc_does(tmp_path):
    """llm.c's dev/data/fineweb.py: EOT + tokens per document, in corpus order; the first shard of the
    stream is val, the document crossing its end is cut there, the rest is train."""
    docs = make_docs(200, seed=3)
    local = fineweb_parquet(tmp_path / "000_00000.parquet", docs)
    out = tmp_path / "fw"
    run_prepare(
        "--dataset",
        "fineweb10B",
        "--files",
        local,
        "--out",
        out,
        "--val-first-tokens",
        1500,
        "--shard-tokens",
        1000,
        "--num-proc",
        2,
    )
    stream = np.concatenate([[EOT, *ENC.encode_ordinary(d)] for d in docs]).astype(np.uint16)
    assert np.array_equal(read_split(out, "val"), stream[:1500])
    assert np.array_equal(read_split(out, "train"), stream[1500:])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["source"]["dataset"] == "fineweb10B"  # what the files hold: the run's references check it
    assert [e["num_tokens"] for e in manifest["splits"]["val"]["shards"]] == [1000, 500]


def test_named_datasets_read_the_hub_copies_llmc_reads():
    sys.path.insert(0, str(REPO))
    from data_prep import prepare

    for name, hub, config in [
        ("fineweb10B", "HuggingFaceFW/fineweb", "sample-10BT"),
        ("fineweb-edu10B", "HuggingFaceFW/fineweb-edu", "sample-10BT"),
        ("openwebtext", "Skylion007/openwebtext", None),
    ]:
        args = prepare.parse_args(["--dataset", name, "--out", "x"])
        source = prepare.make_source(args).describe()
        assert (source["dataset"], source["name"], source["split"]) == (hub, config, "train")
        assert prepare.val_first_tokens(args) == (None if name == "openwebtext" else 100_000_000)
    assert prepare.make_source(prepare.parse_args(["--out", "x"])).describe()["dataset"] == "Skylion007/openwebtext"
