"""Pure tier: each stage builds only its own segment of the model (issue 15).

``build_segment`` gives one segment's tensors real storage and leaves every other tensor on
the meta device: by random init with exactly the values the whole model has for the seed,
or by reading only the segment's keys from a local safetensors checkpoint. Real
transformers models of every tiny family, CPU, fp32; no Ray, no DeepSpeed.
"""

import copy
import json
import logging
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from families import TINY
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from splitlearn.errors import ModelError
from splitlearn.models import Segment, adapter_for, tied_parameter_names
from splitlearn.models.build import build_model, build_segment, meta_model
from splitlearn.models.hf_checkpoint import STAGE_MARKER, write_stage_dirs
from splitlearn.models.materialize import meta_tensor_names

FAMILIES = sorted(TINY)
TIED = [f for f in FAMILIES if f in ("gpt2", "opt", "qwen2")]  # tie_word_embeddings (default or set)
N = 4  # blocks of every tiny config: chain 0 = embed, 1..4 = blocks, 5 = head
assert all(TINY[f].get("n_layer", TINY[f].get("num_hidden_layers")) == N for f in FAMILIES)
CUTS = [(0, 1), (1, 2), (N, N + 1), (N + 1, N + 2), (0, 3), (2, N + 2)]
RANGES = [(0, 2), (2, 4), (4, N + 2)]  # a three-stage plan
SRC_SEED = 3  # checkpoints hold this seed's values, loaded with seed 0: random init cannot pass


def model_cfg(family, **extra):
    return SimpleNamespace(
        family=family, path=None, config={**TINY[family], **extra}, adapter_module=None, attn_implementation="sdpa"
    )


def dir_cfg(path):
    return SimpleNamespace(family=None, path=str(path), config=None, adapter_module=None, attn_implementation="sdpa")


def cut_id(c):
    return f"{c[0]}-{c[1]}"


def tensors(module):
    """Every parameter and buffer, under each of its names (a tied weight under both)."""
    return {
        **dict(module.named_parameters(remove_duplicate=False)),
        **dict(module.named_buffers(remove_duplicate=False)),
    }


def sharing(module):
    """Which names share one tensor: the ties as objects, not only as values."""
    groups = {}
    for name, t in tensors(module).items():
        groups.setdefault(id(t), set()).add(name)
    return sorted(sorted(g) for g in groups.values())


def assert_same(seg, ref):
    """Same names, and each tensor equal in dtype and value, on the CPU; ties the same."""
    assert meta_tensor_names(seg) == []
    got, want = tensors(seg.model), tensors(ref.model)
    assert set(got) == set(want), f"names differ: {sorted(set(got) ^ set(want))}"
    for name, w in want.items():
        g = got[name]
        assert g.device.type == "cpu", name
        assert g.dtype == w.dtype, f"{name}: {g.dtype} != {w.dtype}"
        assert isinstance(g, torch.nn.Parameter) == isinstance(w, torch.nn.Parameter), name
        assert g.requires_grad == w.requires_grad, name
        assert torch.equal(g, w), f"{name} differs"
    assert seg.tied == ref.tied
    assert sharing(seg.model) == sharing(ref.model)


def batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 96, (3, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    mask[2, 4:] = 0
    labels = ids.clone()
    labels[mask == 0] = -100
    return ids, mask, labels


def stored_keys(path):
    """The keys of a checkpoint directory (single file or shards)."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        return set(json.loads(index.read_text())["weight_map"])
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        return set(f.keys())


def layer_of(family, key):
    """The chain layer a checkpoint key belongs to, from the family's paths alone."""
    ad = adapter_for(family)
    m = re.match(rf"{re.escape(ad.blocks_path)}\.(\d+)\.", key)
    if m:
        return int(m.group(1)) + 1
    name = re.sub(r"^embed_out\.", "lm_head.", key)  # GPT-NeoX checkpoints' name of the head
    if any(name.startswith(p + ".") for p in ad.embed_paths):
        return 0
    if any(name.startswith(p + ".") for p in ad.head_paths):
        return N + 1
    raise AssertionError(f"{key}: no chain layer")


def block_indices(family, keys):
    pattern = re.compile(rf"{re.escape(adapter_for(family).blocks_path)}\.(\d+)\.")
    return {int(m.group(1)) for k in keys if (m := pattern.match(k))}


def copy_config(src, dst):
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copy(src / "config.json", dst / "config.json")
    return dst


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """(directory, source model) of a checkpoint ``save_pretrained`` wrote: ``single`` (one
    file), ``sharded`` (index + shards) or ``bf16`` (the model cast to bf16 first)."""
    made = {}

    def make(family, variant):
        if (family, variant) not in made:
            src = build_model(model_cfg(family), SRC_SEED)
            d = tmp_path_factory.mktemp(f"{family}-{variant}")
            if variant == "single":
                src.save_pretrained(d)
            elif variant == "sharded":
                src.save_pretrained(d, safe_serialization=True, max_shard_size="20KB")
                assert len(set(json.loads((d / "model.safetensors.index.json").read_text())["weight_map"].values())) > 2
                assert not (d / "model.safetensors").exists()
            else:
                src = src.to(torch.bfloat16)
                src.save_pretrained(d)
            made[family, variant] = (d, src)
        return made[family, variant]

    return make


def reference(family, src):
    """A whole fp32 model holding ``src``'s persistent values, cast per tensor (non-persistent
    buffers, the rotary tables, are computed in fp32)."""
    ref = build_model(model_cfg(family), 0)
    ref.load_state_dict({k: v.float() for k, v in src.state_dict().items()})
    return ref


# 1. random init ------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("cut", CUTS, ids=cut_id)
def test_random_segment_equals_whole(family, cut):
    cfg, (a, b) = model_cfg(family), cut
    raw = build_segment(cfg, 0, a, b)
    # the global RNG is left seeded with the run's seed (dropout draws as before)
    assert torch.equal(torch.rand(4), torch.rand(4, generator=torch.Generator().manual_seed(0)))
    real = {n: t for n, t in tensors(raw).items() if t.device.type != "meta"}
    seg = Segment(raw, a, b)
    kept = {id(t) for t in tensors(seg.model).values()}
    # only the segment's tensors got storage: every real one is one the segment keeps (a
    # tied weight may be real under both names), every other tensor is still on meta
    assert set(tensors(seg.model)) <= set(real)
    assert all(id(t) in kept for t in real.values()), sorted(n for n, t in real.items() if id(t) not in kept)
    assert_same(seg, Segment(build_model(cfg, 0), a, b))

    other = Segment(build_segment(cfg, 1, a, b), a, b)
    mats = {n: t for n, t in tensors(seg.model).items() if t.dim() >= 2}
    assert mats
    for name, t in mats.items():
        assert not torch.equal(t, tensors(other.model)[name]), f"{name}: the seed changes nothing"


@pytest.mark.parametrize("family", FAMILIES)
def test_random_init_is_the_familys_own(family):
    """Each module runs the family's ``_init_weights``: per tensor the same distribution as
    transformers' ``from_config`` (constants equal, spreads close), and each block its own draw."""
    from transformers import AutoConfig, AutoModelForCausalLM

    ours = build_model(model_cfg(family), 0)
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(AutoConfig.for_model(family, **TINY[family]), dtype=torch.float32)
    theirs = tensors(hf)
    assert set(tensors(ours)) == set(theirs)
    for name, t in tensors(ours).items():
        t, w = t.detach(), theirs[name].detach()
        assert t.dtype == w.dtype and t.shape == w.shape, name
        if w.numel() < 256 or float(w.std()) == 0.0:  # constants (norms, biases) and rotary tables
            assert torch.equal(t, w), name
        else:
            assert 0.8 < float(t.std() / w.std()) < 1.25, f"{name}: std {float(t.std()):.4g} vs {float(w.std()):.4g}"
    blocks = adapter_for(family).blocks(ours)
    for (name, p0), p1 in zip(blocks[0].named_parameters(), blocks[1].parameters(), strict=True):
        assert p0.dim() < 2 or not torch.equal(p0, p1), f"{name}: blocks 0 and 1 drew the same values"


@pytest.mark.parametrize("family", FAMILIES)
def test_random_segments_chain_to_whole_loss(family):
    cfg = model_cfg(family)
    ids, mask, labels = batch()
    whole = Segment(build_model(cfg, 0), 0, N + 2).eval()
    segments = [Segment(build_segment(cfg, 0, a, b), a, b).eval() for a, b in RANGES]
    with torch.no_grad():
        ref = whole(ids, mask, labels)
        x = ids
        for seg in segments:
            x = seg(x, mask, labels if seg.has_head else None)
    assert torch.isfinite(ref)
    assert torch.equal(x, ref), f"{x.item()} != {ref.item()}"
    if family in TIED:
        assert segments[-1].tied and segments[-1].tied == whole.tied


@pytest.mark.parametrize("family", FAMILIES)
def test_random_segment_in_bf16(family):
    seg = Segment(build_segment(model_cfg(family), 0, 2, N + 2, dtype=torch.bfloat16), 2, N + 2)
    assert meta_tensor_names(seg) == []
    assert {p.dtype for p in seg.parameters()} == {torch.bfloat16}


# 2. local checkpoint ---------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("variant", ["single", "sharded", "bf16"])
def test_checkpoint_segment_equals_whole(family, variant, ckpt):
    d, src = ckpt(family, variant)
    keys = stored_keys(d)
    if family == "gpt_neox":  # the head is stored under its checkpoint name
        assert "embed_out.weight" in keys and "lm_head.weight" not in keys
    if family in TIED:
        assert tied_parameter_names(src)[0][1] not in keys  # only the embedding is stored
    ref = reference(family, src)
    if variant == "bf16":  # the upcast bf16 values, not the fp32 ones the model had
        assert not torch.equal(
            ref.get_input_embeddings().weight, build_model(model_cfg(family), SRC_SEED).get_input_embeddings().weight
        )
    for a, b in [*CUTS, (0, N + 2)]:
        seg = Segment(build_segment(dir_cfg(d), 0, a, b), a, b)
        assert_same(seg, Segment(copy.deepcopy(ref), a, b))


@pytest.mark.parametrize("family", FAMILIES)
def test_checkpoint_segment_cast_to_bf16(family, ckpt):
    d, src = ckpt(family, "single")
    a, b = 2, N + 2
    seg = Segment(build_segment(dir_cfg(d), 0, a, b, dtype=torch.bfloat16), a, b)
    want = Segment(copy.deepcopy(src), a, b).to(torch.bfloat16).model.state_dict()
    got = seg.model.state_dict()
    assert set(got) == set(want)
    for k, v in want.items():
        assert got[k].dtype == torch.bfloat16 and torch.equal(got[k], v), k


@pytest.mark.parametrize("family", TIED)
@pytest.mark.parametrize("same", [True, False], ids=["equal", "different"])
def test_checkpoint_storing_both_tied_keys(family, same, ckpt, tmp_path):
    """Both tied keys stored: tied when equal, two tensors when not, as transformers decides."""
    from transformers import AutoModelForCausalLM

    d, src = ckpt(family, "single")
    state = {k: v.clone() for k, v in src.state_dict().items()}
    embed, head = tied_parameter_names(src)[0]
    if not same:
        state[head] += 1.0
    save_file(state, str(copy_config(d, tmp_path / "ck") / "model.safetensors"), metadata={"format": "pt"})
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "ck", local_files_only=True, dtype=torch.float32)
    assert (hf.get_output_embeddings().weight is hf.get_input_embeddings().weight) == same
    for a, b in [(0, 1), (N + 1, N + 2), (0, N + 2)]:
        seg = Segment(build_segment(dir_cfg(tmp_path / "ck"), 0, a, b), a, b)
        assert_same(seg, Segment(copy.deepcopy(hf), a, b))

    # cut into stage directories: the head key is dropped only where the embedding gives it
    write_stage_dirs(meta_model(dir_cfg(tmp_path / "ck")), tmp_path / "ck", RANGES, tmp_path / "stages")
    union = set().union(*(stored_keys(tmp_path / "stages" / f"stage_{i}") for i in range(len(RANGES))))
    assert union == set(state) - ({head} if same else set())
    a, b = RANGES[-1]
    seg = Segment(build_segment(dir_cfg(tmp_path / "stages" / f"stage_{len(RANGES) - 1}"), 0, a, b), a, b)
    assert_same(seg, Segment(copy.deepcopy(hf), a, b))


def test_checkpoint_without_base_model_prefix(ckpt, tmp_path, caplog):
    """GPT-2 as published: keys without ``transformer.``, no head key, legacy mask buffers."""
    d, src = ckpt("gpt2", "single")
    state = {k.removeprefix("transformer."): v for k, v in src.state_dict().items() if k != "lm_head.weight"}
    for i in range(N):
        state[f"h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 64, 64))
    save_file(state, str(copy_config(d, tmp_path) / "model.safetensors"), metadata={"format": "pt"})
    ref = reference("gpt2", src)
    with caplog.at_level(logging.WARNING):
        for a, b in [*CUTS, (0, N + 2)]:
            assert_same(Segment(build_segment(dir_cfg(tmp_path), 0, a, b), a, b), Segment(copy.deepcopy(ref), a, b))
    assert not [r for r in caplog.records if "name no tensor" in r.getMessage()]


# 3. per-stage directories hold only their keys --------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("variant", ["single", "sharded"])
def test_stage_dirs_hold_only_their_keys(family, variant, ckpt, tmp_path):
    from splitlearn.models.build import STAGE_FIELD

    d, src = ckpt(family, variant)
    source = stored_keys(d)
    ties = tied_parameter_names(src)
    ref = reference(family, src)
    rows = write_stage_dirs(meta_model(dir_cfg(d)), Path(d), RANGES, tmp_path)
    assert [r["stage"] for r in rows] == list(range(len(RANGES)))
    union = set()
    for i, (a, b) in enumerate(RANGES):
        sd = tmp_path / f"stage_{i}"
        assert not (sd / "model.safetensors.index.json").exists()
        keys = stored_keys(sd)
        want = {k for k in source if a <= layer_of(family, k) < b}
        if ties and b == N + 2:  # the head's stage stores the tied embedding it uses
            want |= {e for e, _ in ties}
        assert keys == want, f"stage {i}: {sorted(keys ^ want)}"
        assert block_indices(family, keys) == set(range(max(a, 1) - 1, min(b, N + 1) - 1))
        assert rows[i]["keys"] == len(keys) and rows[i]["dir"] == str(sd)
        marker = json.loads((sd / STAGE_MARKER).read_text())
        assert (marker["stage"], marker["start"], marker["stop"], marker["num_chain"]) == (i, a, b, N + 2)
        union |= keys

        # a stage reads its directory: its range, a part of it, or through model.path's {stage}
        for a2, b2 in [(a, b), (b - 1, b)]:
            seg = Segment(build_segment(dir_cfg(sd), 0, a2, b2), a2, b2)
            assert_same(seg, Segment(copy.deepcopy(ref), a2, b2))
        seg = Segment(build_segment(dir_cfg(tmp_path / f"stage_{STAGE_FIELD}"), 0, a, b, stage=i), a, b)
        assert_same(seg, Segment(copy.deepcopy(ref), a, b))

        # another stage's range is refused, naming the marker
        a2, b2 = RANGES[(i + 1) % len(RANGES)]
        with pytest.raises(ModelError) as e:
            build_segment(dir_cfg(sd), 0, a2, b2)
        assert str(sd / STAGE_MARKER) in str(e.value)
    assert union == source


# 4. bad input ------------------------------------------------------------------------------


def first_block_key(family, state, block):
    prefix = f"{adapter_for(family).blocks_path}.{block}."
    return sorted(k for k in state if k.startswith(prefix) and k.endswith(".weight"))[0]


@pytest.mark.parametrize("family", FAMILIES)
def test_missing_key_fails_only_the_segments_that_need_it(family, ckpt, tmp_path):
    d, src = ckpt(family, "single")
    state = load_file(str(d / "model.safetensors"))
    dropped = first_block_key(family, state, 2)  # block_2: chain layer 3
    del state[dropped]
    file = copy_config(d, tmp_path) / "model.safetensors"
    save_file(state, str(file), metadata={"format": "pt"})
    ref = reference(family, src)
    for a, b in [(0, 3), (N, N + 2)]:  # only their keys are read: the missing one is not
        assert_same(Segment(build_segment(dir_cfg(tmp_path), 0, a, b), a, b), Segment(copy.deepcopy(ref), a, b))
    for a, b in [(3, 4), (2, N + 2), (0, N + 2)]:
        with pytest.raises(ModelError) as e:
            build_segment(dir_cfg(tmp_path), 0, a, b)
        assert str(file) in str(e.value) and dropped in str(e.value)


@pytest.mark.parametrize("family", FAMILIES)
def test_wrong_shape_is_named(family, ckpt, tmp_path):
    d, src = ckpt(family, "single")
    state = load_file(str(d / "model.safetensors"))
    bad = first_block_key(family, state, 1)  # block_1: chain layer 2
    state[bad] = torch.zeros(state[bad].shape[0] + 1, *state[bad].shape[1:])
    file = copy_config(d, tmp_path) / "model.safetensors"
    save_file(state, str(file), metadata={"format": "pt"})
    with pytest.raises(ModelError) as e:
        build_segment(dir_cfg(tmp_path), 0, 1, 3)
    assert str(file) in str(e.value) and bad in str(e.value)
    a, b = 3, N + 2
    assert_same(Segment(build_segment(dir_cfg(tmp_path), 0, a, b), a, b), Segment(reference(family, src), a, b))


def test_a_dtype_training_cannot_start_from_is_named(ckpt, tmp_path):
    """A quantized (integer) tensor where the model has a float weight stops with the file
    and key, instead of being copied in as numbers."""
    d, _ = ckpt("llama", "single")
    state = load_file(str(d / "model.safetensors"))
    bad = first_block_key("llama", state, 0)
    state[bad] = torch.zeros(state[bad].shape, dtype=torch.int8)
    file = copy_config(d, tmp_path) / "model.safetensors"
    save_file(state, str(file), metadata={"format": "pt"})
    with pytest.raises(ModelError) as e:
        build_segment(dir_cfg(tmp_path), 0, 0, 3)
    assert str(file) in str(e.value) and bad in str(e.value) and "I8" in str(e.value)


def test_directory_without_safetensors(ckpt, tmp_path):
    d, _ = ckpt("llama", "single")
    copy_config(d, tmp_path)
    with pytest.raises(ModelError) as e:
        build_segment(dir_cfg(tmp_path), 0, 0, 2)
    assert str(tmp_path) in str(e.value) and "safetensors" in str(e.value)
    with pytest.raises(ModelError) as e:
        build_segment(dir_cfg(tmp_path / "nowhere"), 0, 0, 2)
    assert "config.json" in str(e.value)


def test_unreadable_checkpoints(ckpt, tmp_path):
    d, _ = ckpt("llama", "sharded")
    lost = tmp_path / "lost"
    shutil.copytree(d, lost)
    shard = sorted(lost.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(ModelError) as e:
        build_segment(dir_cfg(lost), 0, 0, 2)
    assert "model.safetensors.index.json" in str(e.value) and shard.name in str(e.value)

    garbage = copy_config(d, tmp_path / "garbage") / "model.safetensors"
    garbage.write_bytes(b"not a safetensors file")
    with pytest.raises(ModelError) as e:
        build_segment(dir_cfg(tmp_path / "garbage"), 0, 0, 2)
    assert str(garbage) in str(e.value)
