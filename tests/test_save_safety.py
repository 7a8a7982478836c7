"""Saving never loses a file: destination rules, a kill after every file-system call of a save,
full disks, read-only targets, the user's umask, and KerasHub-layout presets KerasHub cannot load.

The kill injection replaces :data:`refopt.io.journal.fs` (every call a save makes that changes the
file system goes through it) with one that dies after call N -- and refuses every call after that,
as a killed process makes none -- for every N from 0 to the number of calls the save makes.  After
each kill the next load must give exactly the old preset or exactly the new one, and every file
that is not part of a preset must be untouched.
"""

import errno
import json
import os
import stat

import numpy as np
import pytest

from refopt.errors import CheckpointError, DestinationError, SaveError
from refopt.io import journal
from refopt.models import OPTBackbone, OPTCausalLM, OPTCausalLMPreprocessor, OPTTokenizer


def tiny(seed=3, **kw):
    args = dict(vocabulary_size=8, num_layers=1, num_heads=1, hidden_dim=4, intermediate_dim=4,
                max_sequence_length=6, dropout=0.0)
    args.update(kw)
    return OPTBackbone(**args, seed=seed)


def tokenizer(extra=""):
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, "a": 4, "b": 5, "ab": 6, "Ġ": 7}
    if extra:
        vocab[extra] = 8
    return OPTTokenizer(vocabulary=vocab, merges=["a b"])


def model(seed=3, with_tokenizer=True, extra="", **kw):
    pre = OPTCausalLMPreprocessor(tokenizer(extra), sequence_length=5) if with_tokenizer else None
    return OPTCausalLM(tiny(seed, **kw), preprocessor=pre)


def snapshot(lm):
    """What a preset holds, to compare a load with."""
    b = lm.backbone
    out = {"config": b.config, "params": {k: np.array(v) for k, v in b.params.items()}}
    if lm.preprocessor is not None:
        out["vocabulary"] = dict(lm.preprocessor.tokenizer.vocabulary)
        out["sequence_length"] = lm.preprocessor.sequence_length
    return out


def same(a, b) -> bool:
    if a.keys() != b.keys() or a["config"] != b["config"]:
        return False
    if a.get("vocabulary") != b.get("vocabulary") or a.get("sequence_length") != b.get("sequence_length"):
        return False
    return all(np.array_equal(a["params"][k], b["params"][k]) for k in a["params"])


def tree(root):
    """relative path -> bytes (files) or None (directories), under ``root``."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            out[os.path.relpath(os.path.join(dirpath, d), root)] = None
        for f in filenames:
            path = os.path.join(dirpath, f)
            with open(path, "rb") as fh:
                out[os.path.relpath(path, root)] = fh.read()
    return out


class Killed(BaseException):
    """The process died (nothing after it runs: not even cleanup handlers' file-system calls)."""


class Dying(journal.FileSystem):
    """Performs ``limit`` calls, then dies: that call and every later one raise Killed."""

    def __init__(self, limit=None, fail_with=None):
        self.limit, self.calls, self.fail_with, self.names = limit, 0, fail_with, []

    def _step(self, name, args):
        if self.limit is not None and self.calls >= self.limit:
            if self.fail_with is not None:          # an I/O error instead of a kill: once
                self.limit = None
                raise OSError(self.fail_with, os.strerror(self.fail_with))
            raise Killed(name)
        self.calls += 1
        self.names.append((name, args))

    def commit_index(self) -> int:
        """The index of the call that commits a save into an existing directory."""
        return next(i for i, (name, args) in enumerate(self.names)
                    if name == "replace" and os.path.basename(args[1]) == journal.JOURNAL)


for _name in ("mkdir", "create", "pwrite", "truncate", "fsync", "close", "replace", "rename",
              "unlink", "rmdir", "fsync_dir"):
    def _wrapped(self, *args, _name=_name):
        self._step(_name, args)
        return getattr(journal.FileSystem, _name)(self, *args)
    setattr(Dying, _name, _wrapped)


def _save(lm, dst, fmt, overwrite):
    lm.save_to_preset(dst, format=fmt, overwrite=overwrite)


SCENARIOS = {
    # name: (old preset writer or None, new model, format, user files, overwrite)
    "new directory": (None, lambda: model(5), "keras", {}, False),
    "keras over keras, other files kept": (
        lambda d: model(3).save_to_preset(d), lambda: model(5, extra="c"), "keras",
        {"notes.txt": b"mine", "assets/logo.png": b"\x89PNG"}, True),
    "transformers over keras": (
        lambda d: model(3).save_to_preset(d), lambda: model(5, num_layers=2), "huggingface", {}, False),
    "keras without tokenizer over transformers": (
        lambda d: model(3).save_to_preset(d, format="huggingface"),
        lambda: model(5, with_tokenizer=False), "keras", {"README.md": b"card"}, True),
}


EVERY_CALL = bool(os.environ.get("REFOPT_KILL_EVERY_CALL"))


def injection_points(names) -> list[int]:
    """Every call index (``REFOPT_KILL_EVERY_CALL=1``), or -- the default, to keep CI fast -- every
    call but the inner ones of a run of writes into one staged file (its first and last write are
    kept: a kill between two writes of a file not yet committed is a kill after the first)."""
    points = list(range(len(names) + 1))
    if EVERY_CALL:
        return points
    keep = []
    for i in points:
        inner = 0 < i < len(names) - 1 and names[i][0] == "pwrite" and names[i - 1][0] == "pwrite" \
            and names[i + 1][0] == "pwrite" and names[i][1][0] == names[i - 1][1][0] == names[i + 1][1][0]
        if not inner:
            keep.append(i)
    return keep


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_a_kill_after_any_call_leaves_the_old_or_the_new_preset(tmp_path, monkeypatch, scenario):
    import shutil

    make_old, make_new, fmt, user_files, overwrite = SCENARIOS[scenario]
    new_lm = make_new()
    new = snapshot(new_lm)
    template = tmp_path / "template"
    if make_old is not None:
        make_old(template)
        for rel, data in user_files.items():
            (template / rel).parent.mkdir(parents=True, exist_ok=True)
            (template / rel).write_bytes(data)
        old = snapshot(OPTCausalLM.from_preset(template))
        old_tree = tree(template)

    def fresh(root):
        root.mkdir()
        if make_old is not None:
            shutil.copytree(template, root / "preset", symlinks=True)
        return root / "preset"

    # the calls a whole save makes
    dst = fresh(tmp_path / "count")
    counter = Dying()
    monkeypatch.setattr(journal, "fs", counter)
    _save(new_lm, dst, fmt, overwrite)
    monkeypatch.setattr(journal, "fs", journal.FileSystem())
    total = counter.calls
    points = injection_points(counter.names)
    outcomes = {"old": 0, "new": 0}
    for n in points:
        dst = fresh(tmp_path / f"kill{n}")
        monkeypatch.setattr(journal, "fs", Dying(n))
        try:
            _save(new_lm, dst, fmt, overwrite)
            assert n == total, f"the save finished after {n} of {total} calls"
        except Killed:
            assert n < total
        monkeypatch.setattr(journal, "fs", journal.FileSystem())
        # the next load: exactly the old preset or exactly the new one
        if make_old is None and not dst.exists():
            outcomes["old"] += 1
            continue
        got = snapshot(OPTCausalLM.from_preset(dst))
        if same(got, new):
            outcomes["new"] += 1
        else:
            assert make_old is not None and same(got, old), f"kill after call {n}: neither preset"
            assert tree(dst) == old_tree, f"kill after call {n}: the old preset's files changed"
            outcomes["old"] += 1
        for rel, data in user_files.items():
            assert (dst / rel).read_bytes() == data, f"kill after call {n}: {rel} changed"
        leftovers = [p for p in os.listdir(dst) if p.startswith(".refopt")]
        assert not leftovers, f"kill after call {n}: the load left {leftovers}"
        shutil.rmtree(tmp_path / f"kill{n}")
    assert outcomes["old"] > 0 and outcomes["new"] > 0
    print(f"\n{scenario}: {total} calls, {len(points)} injection points: {outcomes}")


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EIO])
def test_io_errors_leave_the_old_preset_and_nothing_behind(tmp_path, monkeypatch, code):
    """A disk filling up (or turning read-only) at any call before the commit."""
    dst = tmp_path / "p"
    model(3).save_to_preset(dst)
    before, parent_before = tree(dst), sorted(os.listdir(tmp_path))
    counter = Dying()
    monkeypatch.setattr(journal, "fs", counter)
    model(5).save_to_preset(dst)
    commit = counter.commit_index()
    monkeypatch.setattr(journal, "fs", journal.FileSystem())
    model(3).save_to_preset(dst)
    before = tree(dst)
    for n in injection_points(counter.names[:commit + 1])[:-1]:
        monkeypatch.setattr(journal, "fs", Dying(n, fail_with=code))
        with pytest.raises(SaveError) as e:
            model(5).save_to_preset(dst)
        assert isinstance(e.value, OSError) and e.value.errno == code
        assert str(dst) in str(e.value)
        monkeypatch.setattr(journal, "fs", journal.FileSystem())
        assert tree(dst) == before, f"error at call {n}: the old preset changed"
        assert sorted(os.listdir(tmp_path)) == parent_before
    # and into a new directory: nothing at all is left
    for n in range(8):
        monkeypatch.setattr(journal, "fs", Dying(n, fail_with=code))
        with pytest.raises(SaveError):
            model(5).save_to_preset(tmp_path / "new" / "deeper")
        monkeypatch.setattr(journal, "fs", journal.FileSystem())
        assert sorted(os.listdir(tmp_path)) == parent_before


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions")
def test_really_read_only_directory(tmp_path):
    dst = tmp_path / "p"
    model(3).save_to_preset(dst)
    before = tree(dst)
    os.chmod(dst, 0o555)
    try:
        with pytest.raises(SaveError, match="no permission"):
            model(5).save_to_preset(dst)
    finally:
        os.chmod(dst, 0o755)
    assert tree(dst) == before


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_files_get_the_users_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        model(3).save_to_preset(tmp_path / "p")
        model(3).save_to_preset(tmp_path / "p")          # a replacement too
        model(3).save_to_preset(tmp_path / "h", format="huggingface")
    finally:
        os.umask(old)
    for d in ("p", "h"):
        for dirpath, dirnames, filenames in os.walk(tmp_path / d):
            assert stat.S_IMODE(os.stat(dirpath).st_mode) == 0o777 & ~umask, dirpath
            for f in filenames:
                assert stat.S_IMODE(os.stat(os.path.join(dirpath, f)).st_mode) == 0o666 & ~umask, f


# ------------------------------------------------------------------------------ destinations
def test_refused_destinations(tmp_path, monkeypatch):
    lm = model(3)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "keep.txt").write_text("x")
    for target in ("", ".", str(tmp_path)):
        with pytest.raises(DestinationError, match="current directory|empty"):
            lm.save_to_preset(target)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    with pytest.raises(DestinationError, match="home directory"):
        lm.save_to_preset("~")
    with pytest.raises(DestinationError, match="root of a file system"):
        lm.save_to_preset("/")
    (tmp_path / "file").write_text("precious")
    for overwrite in (False, True):
        with pytest.raises(DestinationError, match="not a directory"):
            lm.save_to_preset(tmp_path / "file", overwrite=overwrite)
        with pytest.raises(DestinationError, match="not a directory"):
            lm.backbone.save_to_preset(tmp_path / "file", overwrite=overwrite)
        with pytest.raises(DestinationError, match="not a directory"):
            lm.preprocessor.tokenizer.save_to_preset(tmp_path / "file", overwrite=overwrite)
    assert (tmp_path / "file").read_text() == "precious"
    os.symlink(tmp_path / "nowhere", tmp_path / "dangling")
    with pytest.raises(DestinationError, match="broken symbolic link"):
        lm.save_to_preset(tmp_path / "dangling", overwrite=True)
    assert isinstance(DestinationError("x"), OSError)
    assert sorted(os.listdir(tmp_path)) == ["dangling", "file", "home", "keep.txt"]


def test_other_files_need_overwrite_and_are_kept(tmp_path):
    d = tmp_path / "mixed"
    (d / "sub").mkdir(parents=True)
    (d / "notes.txt").write_text("mine")
    (d / "sub" / "data.bin").write_bytes(b"\0\1")
    (d / ".git").mkdir()
    with pytest.raises(DestinationError, match=r"notes\.txt") as e:
        model(3).save_to_preset(d)
    assert "overwrite=True" in str(e.value)
    model(3).save_to_preset(d, overwrite=True)
    assert (d / "notes.txt").read_text() == "mine" and (d / "sub" / "data.bin").read_bytes() == b"\0\1"
    assert same(snapshot(OPTCausalLM.from_preset(d)), snapshot(model(3)))
    # cwd with overwrite: only preset files are written
    model(5).save_to_preset(d, overwrite=True, format="huggingface")
    assert (d / "notes.txt").read_text() == "mine" and (d / ".git").is_dir()
    assert not (d / "model.weights.h5").exists()          # the old preset's files are replaced


def test_a_preset_directory_is_replaced_without_asking(tmp_path):
    d = tmp_path / "p"
    model(3).save_to_preset(d)
    model(5).save_to_preset(d)
    assert same(snapshot(OPTCausalLM.from_preset(d)), snapshot(model(5)))


def test_stale_preset_files_go(tmp_path):
    """A sharded transformers checkpoint replaced by a single-file one: the index and shards go
    (else the loader would read the old weights), the new model loads."""
    d = tmp_path / "p"
    old = model(3)
    old.save_to_preset(d, format="huggingface")
    from refopt.io import safetensors_io

    state = safetensors_io.load(d / "model.safetensors")
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[::2],
              "model-00002-of-00002.safetensors": names[1::2]}
    for shard, keys in shards.items():
        safetensors_io.save({k: np.array(state[k]) for k in keys}, d / shard)
    (d / "model.safetensors").unlink()
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: s for s, ks in shards.items() for k in ks}}))
    (d / "tokenizer.json").write_text("{}")                # a stale fast-tokenizer file
    new = model(5)
    new.save_to_preset(d, format="huggingface")
    assert sorted(os.listdir(d)) == sorted(["config.json", "generation_config.json", "merges.txt",
                                            "model.safetensors", "special_tokens_map.json",
                                            "tokenizer_config.json", "vocab.json"])
    assert same(snapshot(OPTCausalLM.from_preset(d)), snapshot(new))


def test_component_saves_keep_the_other_components(tmp_path):
    """KerasHub's flow: backbone.save_to_preset(d), then tokenizer.save_to_preset(d)."""
    d = tmp_path / "p"
    lm = model(3)
    lm.backbone.save_to_preset(d)
    lm.preprocessor.save_to_preset(d)
    got = OPTCausalLM.from_preset(d)
    assert same(snapshot(got), snapshot(lm))
    tiny(9).save_to_preset(d)                              # a new backbone keeps the tokenizer
    assert OPTCausalLM.from_preset(d).preprocessor is not None


def test_interrupted_commit_on_a_read_only_directory_is_explained(tmp_path, monkeypatch):
    d = tmp_path / "p"
    model(3).save_to_preset(d)
    model(3).save_to_preset(tmp_path / "count")
    counter = Dying()
    monkeypatch.setattr(journal, "fs", counter)
    model(5).save_to_preset(tmp_path / "count")
    commit = counter.commit_index()
    monkeypatch.setattr(journal, "fs", Dying(commit + 1))
    with pytest.raises(Killed):
        model(5).save_to_preset(d)
    assert (d / journal.JOURNAL).exists()
    monkeypatch.setattr(journal, "fs", Dying(0, fail_with=errno.EROFS))
    with pytest.raises(CheckpointError, match="interrupted after it committed"):
        OPTCausalLM.from_preset(d)
    monkeypatch.setattr(journal, "fs", journal.FileSystem())
    assert same(snapshot(OPTCausalLM.from_preset(d)), snapshot(model(5)))


def test_a_forged_journal_deletes_nothing(tmp_path):
    d = tmp_path / "p"
    model(3).save_to_preset(d)
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    (d / ".refopt-save-0123456789abcdef").mkdir()
    for forged in ({"staging": ".refopt-save-0123456789abcdef", "files": [], "remove": ["../victim.txt"]},
                   {"staging": "../..", "files": [], "remove": []},
                   {"staging": ".refopt-save-0123456789abcdef", "files": ["/etc/passwd"], "remove": []},
                   ["not", "an", "object"]):
        (d / journal.JOURNAL).write_text(json.dumps(forged))
        with pytest.raises(CheckpointError, match="journal"):
            OPTCausalLM.from_preset(d)
        assert victim.read_text() == "keep me"


def test_keras_layout_of_a_model_kerashub_cannot_build_is_marked(tmp_path, capsys):
    from refopt import cli

    lm = model(3, do_layer_norm_before=False, word_embed_proj_dim=2)
    lm.save_to_preset(tmp_path / "src", format="huggingface")
    assert cli.main(["convert", str(tmp_path / "src"), str(tmp_path / "k"), "--format", "keras"]) == 0
    out = capsys.readouterr().out
    assert "KerasHub preset" not in out and "KerasHub cannot load it" in out
    assert "post-LayerNorm" in out and "projection" in out
    cfg = json.loads((tmp_path / "k" / "config.json").read_text())
    assert cfg["registered_name"] == "refopt>OPTBackbone" and "keras_hub" not in cfg["module"]
    meta = json.loads((tmp_path / "k" / "metadata.json").read_text())
    assert "cannot build" in meta["refopt_only"]
    task = json.loads((tmp_path / "k" / "task.json").read_text())
    assert task["registered_name"] == "refopt>OPTCausalLM"
    again = OPTCausalLM.from_preset(tmp_path / "k")
    assert same(snapshot(again), snapshot(lm))
    assert cli.main(["info", str(tmp_path / "k")]) == 0
    assert "KerasHub cannot load it" in capsys.readouterr().out
    # a model KerasHub can build keeps KerasHub's names
    model(3).save_to_preset(tmp_path / "ok")
    assert json.loads((tmp_path / "ok" / "config.json").read_text())["registered_name"] == \
        "keras_hub>OPTBackbone"


def test_train_refuses_an_existing_output_before_training(tmp_path, capsys):
    from refopt import cli

    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("mine")
    (tmp_path / "t.txt").write_text("hello world " * 50)
    code = cli.main(["train", str(tmp_path / "t.txt"), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "--force" in err and len(err.strip().splitlines()) == 1
    assert os.listdir(tmp_path / "out") == ["x"]


def test_convert_force_keeps_other_files(tmp_path, capsys):
    from refopt import cli

    model(3).save_to_preset(tmp_path / "src")
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "README.md").write_text("mine")
    assert cli.main(["convert", str(tmp_path / "src"), str(dst), "--format", "huggingface"]) == 2
    assert "--force" in capsys.readouterr().err
    assert cli.main(["convert", str(tmp_path / "src"), str(dst), "--format", "huggingface",
                     "--force"]) == 0
    assert (dst / "README.md").read_text() == "mine" and (dst / "model.safetensors").exists()
    assert stat.S_ISREG(os.stat(dst / "model.safetensors").st_mode)
