"""Issue 20's corpus of malformed input: every case is exit code 2, exactly one line on stderr
(``splitlearn: error: ...``) naming the key or the file, nothing on stdout before it, no
traceback, and nothing written (the directory the command runs in is unchanged: no run
directory, no temporary file). In process and without Ray: each case takes milliseconds once
the first has imported torch and transformers."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import ROOT, inline_topology
from families import TINY

from splitlearn.cli import main

LLAMA = {"family": "llama", "config": {**TINY["llama"], "vocab_size": 258}}
GPT2 = {"family": "gpt2", "config": {**TINY["gpt2"], "vocab_size": 258, "bos_token_id": 1, "eos_token_id": 2}}
OPT = {"family": "opt", "config": {**TINY["opt"], "vocab_size": 258}}


def base_config() -> dict[str, Any]:
    return {
        "name": "bad",
        "model": copy.deepcopy(LLAMA),
        "data": {"path": str(ROOT / "data" / "quickstart.txt"), "seq_len": 16},
        "topology": {"inline": inline_topology()},
        "train": {"steps": 2, "batch_size": 4, "micro_batches": 2},
        "plan": {"devices": ["edge-a", "mid-b", "cloud-c"]},
        "runtime": {"output_dir": "runs", "progress": "none", "timeout_s": 60},
    }


@dataclass
class Case:
    id: str
    args: list[str]  # {cfg}: the run config; {tmp}: the directory the command runs in
    needle: str  # in the one error line: the key or the file it names
    config: dict[str, Any] = field(default_factory=dict)  # sections merged over the base config
    files: dict[str, str] = field(default_factory=dict)  # written first (relative to {tmp})
    dirs: list[str] = field(default_factory=list)  # made first


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        whole = k == "model" and "family" in v  # another model: none of the base model's keys
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) and v and not whole else v
    return out


def device(i: int, **changes: Any) -> dict[str, Any]:
    """The base topology with device ``i`` changed."""
    topo = inline_topology()
    topo["devices"][i].update(changes)
    return {"topology": {"inline": topo}}


def links(**default: Any) -> dict[str, Any]:
    topo = inline_topology()
    topo["links"]["default"].update(default)
    return {"topology": {"inline": topo}}


def measured(entries: dict[str, Any]) -> dict[str, Any]:
    topo = inline_topology()
    topo["measured"] = entries
    return {"topology": {"inline": topo}}


def v(id: str, *overrides: str, needle: str, **kw: Any) -> Case:
    """``splitlearn validate`` of the base config with ``overrides``."""
    return Case(id, ["validate", "{cfg}", *overrides], needle, **kw)


def t(id: str, *overrides: str, needle: str, **kw: Any) -> Case:
    """``splitlearn train``: must fail before Ray is started."""
    return Case(id, ["train", "{cfg}", *overrides], needle, **kw)


TOPO_FILE = """devices:
  - {name: edge-a, memory_gb: 2, tflops: 0.02, owns_data: true}
  - {name: cloud-c, tier: cloud, memory_gb: 2, tflops: 0.02}
"""
TOPO = {"topology": {"file": "topo.yaml", "inline": None}}
TWO = ("plan.devices=[edge-a,cloud-c]",)
PLAN_YAML = "stages: [oops\n"

NUMBERS = [
    v("lr-nan", "train.lr=nan", needle="train.lr: must be a finite number"),
    v("lr-inf", "train.lr=inf", needle="train.lr: must be a finite number"),
    v("lr-minus-inf", "train.lr=-inf", needle="train.lr: must be a finite number"),
    v("lr-overflow", "train.lr=1e400", needle="train.lr: must be a finite number"),
    v("lr-zero", "train.lr=0", needle="train.lr: must be > 0"),
    v("lr-negative", "train.lr=-0.1", needle="train.lr: must be > 0"),
    v("lr-word", "train.lr=fast", needle="train.lr"),
    v("weight-decay-nan", "train.weight_decay=nan", needle="train.weight_decay"),
    v("weight-decay-negative", "train.weight_decay=-1", needle="train.weight_decay"),
    v("grad-norm-inf", "train.max_grad_norm=inf", needle="train.max_grad_norm"),
    v("warmup-negative", "train.warmup_steps=-1", needle="train.warmup_steps"),
    v("steps-zero", "train.steps=0", needle="train.steps: must be >= 1"),
    v("steps-fraction", "train.steps=1.5", needle="train.steps"),
    v("steps-word", "train.steps=many", needle="train.steps"),
    v("batch-zero", "train.batch_size=0", needle="train.batch_size"),
    v("micro-zero", "train.micro_batches=0", needle="train.micro_batches"),
    v("micro-not-dividing", "train.micro_batches=3", needle="train.micro_batches: 3 does not divide"),
    v("batch-huge", "train.batch_size=1000000000000", needle="train.batch_size"),
    v(
        "batch-beyond-int64",
        "train.batch_size=100000000000000000000000",
        "train.micro_batches=1",
        needle="train.batch_size",
    ),
    t("batch-huge-train", "train.batch_size=1000000000000", needle="train.batch_size"),
    v("seq-huge", "data.seq_len=1000000000", needle="data.seq_len"),
    v("seq-one", "data.seq_len=1", needle="data.seq_len: must be >= 2"),
    v("seq-nan", "data.seq_len=nan", needle="data.seq_len"),
    v("timeout-nan", "runtime.timeout_s=nan", needle="runtime.timeout_s: must be a finite number"),
    v("timeout-zero", "runtime.timeout_s=0", needle="runtime.timeout_s"),
    v("placement-timeout-inf", "runtime.placement_timeout_s=inf", needle="runtime.placement_timeout_s"),
    v("log-every-zero", "runtime.log_every=0", needle="runtime.log_every"),
    v("restarts-negative", "runtime.max_restarts=-1", needle="runtime.max_restarts"),
    v("mmap-negative", "runtime.malloc_mmap_threshold_kb=-1", needle="runtime.malloc_mmap_threshold_kb"),
    v("arenas-negative", "runtime.malloc_arena_max=-2", needle="runtime.malloc_arena_max"),
    v("keep-zero", "checkpoint.keep=0", needle="checkpoint.keep"),
    v("every-negative", "checkpoint.every_steps=-1", needle="checkpoint.every_steps"),
    v("lora-rank-zero", "finetune.lora.r=0", needle="finetune.lora.r"),
    v("lora-alpha-nan", "finetune.lora.alpha=nan", needle="finetune.lora.alpha"),
    v("lora-dropout-one", "finetune.lora.dropout=1.0", needle="finetune.lora.dropout"),
    v("lora-dropout-nan", "finetune.lora.dropout=nan", needle="finetune.lora.dropout"),
    v("search-inf", "plan.search_seconds=inf", needle="plan.search_seconds"),
    v("num-cpus-zero", "ray.num_cpus=0", needle="ray.num_cpus"),
    v("connect-timeout-zero", "ray.connect_timeout_s=0", needle="ray.connect_timeout_s"),
    v("connect-timeout-nan", "ray.connect_timeout_s=nan", needle="ray.connect_timeout_s"),
    v(
        "memory-nan",
        needle="topology.devices[0].memory_gb: must be a finite number",
        config=device(0, memory_gb=math.nan),
    ),
    v(
        "memory-inf",
        needle="topology.devices[1].memory_gb: must be a finite number",
        config=device(1, memory_gb=math.inf),
    ),
    v("memory-zero", needle="topology.devices[2].memory_gb", config=device(2, memory_gb=0)),
    v("tflops-negative", needle="topology.devices[0].tflops", config=device(0, tflops=-1)),
    v("host-memory-nan", needle="topology.devices[0].host_memory_gb", config=device(0, host_memory_gb=math.nan)),
    v("threads-zero", needle="topology.devices[0].cpu_threads", config=device(0, cpu_threads=0)),
    v("gpus-negative", needle="topology.devices[3].gpus", config=device(3, gpus=-1)),
    v("bandwidth-zero", needle="topology.links.default.bandwidth_mbps", config=links(bandwidth_mbps=0)),
    v("latency-nan", needle="topology.links.default.latency_ms", config=links(latency_ms=math.nan)),
    v(
        "measured-unknown-device",
        needle="topology.measured.edge-a->nowhere: expected 'SRC->DST'",
        config=measured({"edge-a->nowhere": {"bandwidth_mbps": 100, "latency_ms": 1}}),
    ),
    v(
        "measured-bandwidth-zero",
        needle="topology.measured.edge-a->mid-b.bandwidth_mbps",
        config=measured({"edge-a->mid-b": {"bandwidth_mbps": 0, "latency_ms": 1}}),
    ),
    v("memory-word", needle="topology.devices[0].memory_gb", config=device(0, memory_gb="lots")),
]

CHOICES = [
    v("dtype", "train.dtype=fp8", needle="train.dtype: 'fp8' is not one of"),
    v("schedule", "runtime.schedule=zigzag", needle="runtime.schedule"),
    v("method", "finetune.method=qlora", needle="finetune.method"),
    v("data-format", "data.format=csv", needle="data.format"),
    v("progress", "runtime.progress=loud", needle="runtime.progress"),
    v("partitioner", "plan.partitioner=magic", needle="plan.partitioner"),
    v("codec", "plan.codec=zip", needle="plan.codec"),
    v("allow", "plan.allow=[turbo]", needle="plan.allow[0]"),
    v("attention", "model.attn_implementation=flash", needle="model.attn_implementation"),
    v("tier", needle="topology.devices[0].tier", config=device(0, tier="fog")),
    v("accelerator", needle="topology.devices[0].accelerator", config=device(0, accelerator="tpu")),
    v("by-tier", "finetune.by_tier.fog.method=lora", needle="finetune.by_tier.fog"),
    v("by-stage", "finetune.by_stage.9.method=lora", needle="finetune.by_stage.9"),
]

SHAPES = [
    v(
        "devices-mapping",
        needle="plan.devices: expected a list, got a mapping",
        config={"plan": {"devices": {"edge-a": 1}}},
    ),
    v("devices-mapping-override", "plan.devices={edge-a:1}", needle="plan.devices: expected a list, got a mapping"),
    v("cuts-mapping", needle="plan.cuts: expected a list", config={"plan": {"cuts": {"a": 1}}}),
    v("by-tier-list", needle="finetune.by_tier: expected a mapping", config={"finetune": {"by_tier": ["edge"]}}),
    v("model-config-list", needle="model.config: expected a mapping", config={"model": {"config": [1, 2]}}),
    v("section-list", needle="data: expected a mapping", config={"data": [1, 2]}),
    v(
        "topology-devices-mapping",
        needle="topology.devices: expected a list",
        config={"topology": {"inline": {"devices": {"a": 1}}}},
    ),
    v("unknown-key", "train.lrr=1", needle="train.lrr"),
    v("unknown-section", "foo.bar=1", needle="foo"),
    v("unknown-key-in-file", needle="trian", config={"trian": {"steps": 1}}),
    v("unknown-device-key", needle="topology.devices[0].memroy_gb", config=device(0, memroy_gb=1)),
    Case(
        "config-is-a-list",
        ["validate", "{tmp}/list.yaml"],
        "list.yaml: expected a mapping",
        files={"list.yaml": "- a\n- b\n"},
    ),
    Case("config-empty", ["validate", "{tmp}/empty.yaml"], "empty.yaml: expected a mapping", files={"empty.yaml": ""}),
    Case("config-scalar", ["validate", "{tmp}/s.yaml"], "s.yaml: expected a mapping", files={"s.yaml": "42\n"}),
]

MODEL = [
    v("heads-not-dividing", "model.config.num_attention_heads=3", needle="model.config.num_attention_heads"),
    v("kv-heads-not-dividing", "model.config.num_key_value_heads=3", needle="model.config.num_key_value_heads"),
    v("hidden-word", "model.config.hidden_size=wide", needle="model.config.hidden_size"),
    v("hidden-nan", "model.config.hidden_size=nan", needle="model.config.hidden_size"),
    v("layers-negative", "model.config.num_hidden_layers=-1", needle="model.config.num_hidden_layers"),
    v("layers-zero", "model.config.num_hidden_layers=0", needle="model.config.num_hidden_layers"),
    v("vocab-zero", "model.config.vocab_size=0", needle="model.config.vocab_size"),
    v("intermediate-negative", "model.config.intermediate_size=-5", needle="model.config.intermediate_size"),
    v("activation", "model.config.hidden_act=nonexistent", needle="model.config.hidden_act"),
    v(
        "gpt2-activation",
        "model.config.activation_function=nope",
        needle="model.config.activation_function",
        config={"model": GPT2},
    ),
    v("gpt2-heads", "model.config.n_head=5", needle="model.config.n_head", config={"model": GPT2}),
    v("family-bert", "model.family=bert", needle="model.family: model family 'bert' is not supported"),
    v("family-unknown", "model.family=nonexistent", needle="model.family"),
    v("no-model", "model.family=null", needle="model: set exactly one"),
    v("path-missing", "model.family=null", "model.path={tmp}/nowhere", needle="model.path: directory not found"),
    v("path-is-a-file", "model.family=null", "model.path={tmp}/f.txt", needle="model.path: ", files={"f.txt": "x"}),
    v(
        "path-without-config",
        "model.family=null",
        "model.path={tmp}/ck",
        needle="model.path: no config.json",
        dirs=["ck"],
    ),
    v(
        "path-garbage-config",
        "model.family=null",
        "model.path={tmp}/ck",
        needle="config.json",
        files={"ck/config.json": "{not json"},
    ),
    v("adapter-module", "model.adapter_module=no_such_module_xyz", needle="model.adapter_module"),
    v(
        "gpt2-positions",
        "data.seq_len=65",
        needle="data.seq_len: 65 is beyond the 64 positions",
        config={"model": GPT2},
    ),
    t("gpt2-positions-train", "data.seq_len=65", needle="data.seq_len: 65 is beyond", config={"model": GPT2}),
    v("gpt2-positions-huge", "data.seq_len=1000000000", needle="data.seq_len", config={"model": GPT2}),
    v("opt-positions", "data.seq_len=65", needle="data.seq_len: 65 is beyond", config={"model": OPT}),
]

YAML_SYNTAX = [
    v("override-unclosed-list", "plan.cuts=[1,2", needle="override 'plan.cuts=[1,2': the value is not valid YAML"),
    v("override-unclosed-mapping", "train={a", needle="override 'train={a'"),
    v("override-unclosed-quote", "data.path='x", needle="override 'data.path='x'"),
    v("override-no-key", "=5", needle="override '=5': expected key=value"),
    v("override-no-value", "train.steps", needle="override 'train.steps': expected key=value"),
    Case(
        "file-bad-indent",
        ["validate", "{tmp}/b.yaml"],
        "b.yaml: not valid YAML",
        files={"b.yaml": "train:\n  steps: 1\n bad: 2\n"},
    ),
    Case(
        "file-bad-indent-line",
        ["validate", "{tmp}/b.yaml"],
        "line 3",
        files={"b.yaml": "train:\n  steps: 1\n bad: 2\n"},
    ),
    Case(
        "file-unclosed-quote",
        ["validate", "{tmp}/b.yaml"],
        "line 1, column",
        files={"b.yaml": 'name: "run\ntrain: {}\n'},
    ),
    Case("file-tab", ["validate", "{tmp}/b.yaml"], "line 2", files={"b.yaml": "train:\n\tsteps: 1\n"}),
    Case(
        "file-duplicate-section",
        ["validate", "{tmp}/d.yaml"],
        "duplicate key 'train' (line 3)",
        files={"d.yaml": "train: {}\nname: x\ntrain: {}\n"},
    ),
    Case(
        "file-duplicate-key",
        ["validate", "{tmp}/d.yaml"],
        "train.steps",
        files={"d.yaml": "train:\n  steps: 1\n  steps: 2\n"},
    ),
    v(
        "topology-duplicate-key",
        *TWO,
        needle="memory_gb",
        config=TOPO,
        files={"topo.yaml": TOPO_FILE.replace("memory_gb: 2,", "memory_gb: 2, memory_gb: 3,", 1)},
    ),
    v("topology-bad-yaml", *TWO, needle="topo.yaml: not valid YAML", config=TOPO, files={"topo.yaml": "devices: [\n"}),
    v("topology-bad-yaml-line", *TWO, needle="line", config=TOPO, files={"topo.yaml": "devices: [\n"}),
    Case("config-missing", ["validate", "{tmp}/nowhere.yaml"], "config file not found: "),
    Case("config-is-a-directory", ["validate", "{tmp}/cfgdir"], "cfgdir is a directory", dirs=["cfgdir"]),
    v("topology-file-missing", "topology.inline=null", "topology.file=nowhere.yaml", needle="topology file not found"),
    v(
        "topology-file-directory",
        "topology.inline=null",
        "topology.file={tmp}/tdir",
        needle="tdir is a directory",
        dirs=["tdir"],
    ),
]

FILES = [
    v("data-missing", "data.path={tmp}/nowhere.txt", needle="data.path: file not found"),
    v("data-directory", "data.path={tmp}/ddir", needle="data.path: ", dirs=["ddir"]),
    v("data-directory-named", "data.path={tmp}/ddir", needle="neither a `Dataset` directory", dirs=["ddir"]),
    v(
        "data-bad-jsonl",
        "data.path={tmp}/bad.jsonl",
        needle="bad.jsonl:2: not valid JSON",
        files={"bad.jsonl": '{"text": "ok"}\nnope\n'},
    ),
    v("data-jsonl-no-text", "data.path={tmp}/bad.jsonl", needle="bad.jsonl:1", files={"bad.jsonl": '{"body": "ok"}\n'}),
    v("data-empty", "data.path={tmp}/empty.txt", needle="holds no text", files={"empty.txt": "\n\n"}),
    v(
        "data-too-short",
        "data.path={tmp}/short.txt",
        "data.seq_len=64",
        needle="fewer than data.seq_len",
        files={"short.txt": "hi\n"},
    ),
    v("tokenizer-directory", "data.tokenizer={tmp}/tok", needle="data.tokenizer", dirs=["tok"]),
    v("tokenizer-garbage", "data.tokenizer={tmp}/tok.json", needle="data.tokenizer", files={"tok.json": "{oops"}),
    v("profile-directory", "plan.profile={tmp}/pdir", needle="plan.profile: ", dirs=["pdir"]),
    v("profile-garbage", "plan.profile={tmp}/p.json", needle="plan.profile", files={"p.json": "[1, 2"}),
]

OUTPUT = [
    v("output-dir-is-a-file", "runtime.output_dir={tmp}/afile", needle="runtime.output_dir", files={"afile": ""}),
    t("output-dir-is-a-file-train", "runtime.output_dir={tmp}/afile", needle="runtime.output_dir", files={"afile": ""}),
    t(
        "output-dir-under-a-file",
        "runtime.output_dir={tmp}/afile/runs",
        needle="runtime.output_dir",
        files={"afile": ""},
    ),
    t("output-dir-proc", "runtime.output_dir=/proc/splitlearn-runs", needle="runtime.output_dir"),
    t("run-name-up", "runtime.run_name=../../x", needle="runtime.run_name: '../../x' must be a name"),
    t("run-name-absolute", "runtime.run_name=/tmp/x", needle="runtime.run_name"),
    t("run-name-nested", "runtime.run_name=a/b", needle="runtime.run_name"),
    t("run-name-dotdot", "runtime.run_name=..", needle="runtime.run_name"),
    t("run-name-dot", "runtime.run_name=.", needle="runtime.run_name"),
    t("run-name-backslash", "runtime.run_name=a\\b", needle="runtime.run_name"),
    t("resume-not-a-run", "--resume", "{tmp}", needle="--resume"),
    Case("plan-out-missing-dir", ["plan", "{cfg}", "--out", "{tmp}/nodir/plan.yaml"], "nodir does not exist"),
    Case("plan-out-is-a-directory", ["plan", "{cfg}", "--out", "{tmp}/odir"], "odir: is a directory", dirs=["odir"]),
    Case(
        "plan-timeline-missing-dir",
        ["plan", "{cfg}", "--out", "p.yaml", "--timeline", "{tmp}/x/t.png"],
        "x does not exist",
    ),
    Case(
        "plan-memory-is-a-directory",
        ["plan", "{cfg}", "--out", "p.yaml", "--memory", "{tmp}/odir"],
        "odir",
        dirs=["odir"],
    ),
    Case("plan-compare", ["plan", "{cfg}", "--out", "p.yaml", "--compare", "uniform,magic"], "--compare: 'magic'"),
    Case("profile-out-missing-dir", ["profile", "{cfg}", "--out", "{tmp}/nodir/p.json"], "nodir does not exist"),
    Case("profile-layers", ["profile", "{cfg}", "--out", "p.json", "--layers", "x:y"], "--layers"),
    Case("profile-repeats", ["profile", "{cfg}", "--out", "p.json", "--repeats", "0"], "--repeats"),
    Case("data-into-directory", ["data", "{tmp}"], "is a directory"),
    Case("data-under-a-file", ["data", "{tmp}/afile/q.txt"], "afile", files={"afile": ""}),
    Case("data-docs-zero", ["data", "q.txt", "--docs", "0"], "--docs"),
    Case(
        "timeline-garbage-plan",
        ["timeline", "{tmp}/run", "--out", "t.png"],
        "plan.yaml",
        files={"run/plan.yaml": PLAN_YAML, "run/metrics.jsonl": "{}\n"},
    ),
    Case(
        "timeline-plan-is-a-list",
        ["timeline", "{tmp}/run", "--out", "t.png"],
        "plan.yaml",
        files={"run/plan.yaml": "- 1\n- 2\n", "run/metrics.jsonl": "{}\n"},
    ),
    Case(
        "timeline-garbage-metrics",
        ["timeline", "{tmp}/run", "--out", "t.png"],
        "metrics.jsonl",
        files={"run/plan.yaml": "PLAN", "run/metrics.jsonl": "{oops\n"},
    ),
    Case("timeline-missing-run", ["timeline", "{tmp}/nowhere", "--out", "t.png"], "nowhere"),
    Case("timeline-run-is-a-file", ["timeline", "{tmp}/afile", "--out", "t.png"], "afile", files={"afile": ""}),
    Case(
        "timeline-out-missing-dir",
        ["timeline", "{tmp}/run", "--out", "{tmp}/nodir/t.png"],
        "nodir does not exist",
        files={"run/plan.yaml": "PLAN", "run/metrics.jsonl": "{}\n"},
    ),
    Case(
        "shard-garbage-plan",
        ["shard", "{tmp}/ck", "--plan", "{tmp}/p.yaml", "--out", "{tmp}/st"],
        "--plan",
        files={"p.yaml": PLAN_YAML},
        dirs=["ck"],
    ),
    Case(
        "shard-plan-directory", ["shard", "{tmp}/ck", "--plan", "{tmp}/ck", "--out", "{tmp}/st"], "--plan", dirs=["ck"]
    ),
]

PLANS = [
    v("second-data-owner", needle="topology.devices[1].owns_data", config=device(1, owns_data=True)),
    v("no-data-owner", needle="no device has owns_data", config=device(0, owns_data=False)),
    v("unknown-device", "plan.devices=[edge-a,phantom]", needle="plan.devices[1]: device 'phantom'"),
    v("device-twice", "plan.devices=[edge-a,edge-a]", needle="plan.devices: a device is listed twice"),
    v("manual-without-devices", "plan.partitioner=manual", "plan.devices=[]", needle="plan.devices"),
    v("manual-cuts-count", "plan.partitioner=manual", "plan.cuts=[1]", needle="plan.cuts: 3 stages need 2 cuts"),
    v("manual-cuts-range", "plan.partitioner=manual", "plan.cuts=[1,100]", needle="plan.cuts"),
    v("manual-cuts-order", "plan.partitioner=manual", "plan.cuts=[3,1]", needle="plan.cuts"),
    v(
        "too-many-stages",
        "model.config.num_hidden_layers=1",
        "plan.devices=[edge-a,mid-b,cloud-c,cloud-d]",
        needle="plan.devices",
    ),
    v("does-not-fit", needle="on device 'edge-a' needs", config=device(0, memory_gb=1e-4)),
]

CASES = NUMBERS + CHOICES + SHAPES + MODEL + YAML_SYNTAX + FILES + OUTPUT + PLANS


def _snapshot(root: Path) -> dict[str, tuple[bool, int]]:
    return {str(p.relative_to(root)): (p.is_dir(), p.stat().st_size if p.is_file() else 0) for p in root.rglob("*")}


def _plan_yaml() -> str:
    from partitioners import Plan, Stage

    return Plan(stages=[Stage(index=0, start=0, stop=6, devices=["edge-a"])], partitioner="uniform").to_yaml()


def _no_ray(*args: Any, **kwargs: Any) -> None:
    raise AssertionError("bad input reached the Ray cluster")


def test_the_corpus_is_large_and_named():
    assert len(CASES) >= 80 and len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(tmp_path: Path, capsys, monkeypatch, case: Case):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr("splitlearn.trainer.connect", _no_ray)  # every case fails before Ray starts
    for d in case.dirs:
        (tmp_path / d).mkdir(parents=True)
    for name, text in case.files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(_plan_yaml() if text == "PLAN" else text)
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(_merge(base_config(), case.config)))
    before = _snapshot(tmp_path)
    args = [a.replace("{cfg}", str(cfg)).replace("{tmp}", str(tmp_path)) for a in case.args]
    code = main(args)
    out, err = capsys.readouterr()
    lines = err.splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("splitlearn: error: "), err
    assert case.needle in lines[0], lines[0]
    assert "Traceback" not in err and out == "", out
    assert _snapshot(tmp_path) == before  # nothing written: no run directory, no temporary file
