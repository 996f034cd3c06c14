"""The shard protocol: plans, upstream group split, done-markers, resume, refusing merges."""

from __future__ import annotations

import json
import math

import pytest

from vlprep import VlprepError, shards, storage


def upstream_group_split(ids: list, total_group: int) -> list[list]:
    """VOLTA's load_image_ids split as it ran under Python 2 (integer division floors)."""
    per_num = int(math.floor(len(ids) / total_group))
    out = []
    for group_id in range(total_group):
        if group_id == total_group - 1:
            out.append(ids[group_id * per_num:])
        else:
            out.append(ids[group_id * per_num:(group_id + 1) * per_num])
    return out


@pytest.mark.parametrize("total,n", [(10, 3), (17, 8), (8, 8), (100, 7), (5, 1)])
def test_group_split_reproduces_upstream(total, n):
    ids = list(range(total))
    assert [ids[s:e] for s, e in shards.split_bounds(total, n, "group")] == upstream_group_split(ids, n)


@pytest.mark.parametrize("total,n", [(10, 3), (17, 8), (3, 3), (100, 7)])
def test_balanced_split_covers_everything_once(total, n):
    bounds = shards.split_bounds(total, n)
    sizes = [e - s for s, e in bounds]
    assert bounds[0][0] == 0 and bounds[-1][1] == total
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:], strict=False))
    assert max(sizes) - min(sizes) <= 1


def test_plan_sorts_and_rejects_duplicates(tmp_path):
    specs = shards.plan(["c", "a", "b"], 2, str(tmp_path))
    assert [shards.load(s).items for s in specs] == [["a", "b"], ["c"]]
    with pytest.raises(VlprepError, match="duplicates"):
        shards.plan(["a", "a"], 1, str(tmp_path))


def _writer(calls: list):
    def work(shard):
        calls.append(shard.index)
        storage.write_text(shard.part("rows.txt"), "".join(f"{i}\n" for i in shard.items))
        return {"parts": ["rows.txt"], "failed": []}

    return work


def test_resume_skips_only_verified_shards(tmp_path):
    specs = shards.plan([f"img{i:03d}" for i in range(10)], 3, str(tmp_path))
    calls = []
    for s in specs:
        assert shards.run_shard(s, _writer(calls), "t")["skipped"] is False
    assert calls == [0, 1, 2]
    calls.clear()
    for s in specs:
        assert shards.run_shard(s, _writer(calls), "t")["skipped"] is True
    assert calls == []
    # a damaged part (same size, other bytes) is caught by its checksum and redone
    part = shards.load(specs[1]).part("rows.txt")
    text = storage.read_text(part)
    storage.write_text(part, text.replace("img004", "img999"))
    # a marker-less shard (killed before its marker) is redone
    storage.delete(shards.load(specs[2]).marker)
    for s in specs:
        shards.run_shard(s, _writer(calls), "t")
    assert calls == [1, 2]
    assert storage.read_text(part) == text


def test_marker_written_last_and_records_what_it_must(tmp_path):
    spec = shards.plan(["a", "b"], 1, str(tmp_path))[0]

    def work(shard):
        assert not storage.exists(shard.marker)
        storage.write_text(shard.part("p"), "ab")
        return {"parts": ["p"], "failed": [{"item": "b", "error": "corrupt"}]}

    shards.run_shard(spec, work, "t")
    marker = json.loads(storage.read_text(shards.load(spec).marker))
    assert marker["items"] == 2 and marker["failed"] == [{"item": "b", "error": "corrupt"}]
    assert marker["parts"][0]["bytes"] == 2 and len(marker["parts"][0]["sha256"]) == 64
    assert marker["versions"]["vlprep"]


def test_a_new_plan_invalidates_old_markers(tmp_path):
    spec = shards.plan(["a", "b"], 1, str(tmp_path))[0]
    shards.run_shard(spec, _writer([]), "t")
    spec = shards.plan(["a", "b", "c"], 1, str(tmp_path))[0]
    calls = []
    assert shards.run_shard(spec, _writer(calls), "t")["skipped"] is False and calls == [0]


def test_collect_names_missing_and_inconsistent_shards(tmp_path):
    specs = shards.plan(list(range(6)), 3, str(tmp_path))
    for s in specs[:2]:
        shards.run_shard(s, _writer([]), "t")
    with pytest.raises(VlprepError, match=r"shard-00002-of-00003\.done\.json: shard 2 of 3 has no done-marker"):
        shards.collect(specs[0]["plan"])
    shards.run_shard(specs[2], _writer([]), "t")
    storage.write_text(shards.load(specs[0]).part("rows.txt"), "tampered\n")
    with pytest.raises(VlprepError, match="shard 0 of 3 does not match"):
        shards.collect(specs[0]["plan"])


def test_merged_bytes_do_not_depend_on_shard_count(tmp_path):
    items = [f"{i:04d}" for i in range(37)]
    merged = set()
    for n in (1, 2, 5, 8, 37):
        root = str(tmp_path / f"n{n}")
        for s in shards.plan(items, n, root):
            shards.run_shard(s, _writer([]), "t")
        merged.add("".join(storage.read_text(sh.part("rows.txt")) for sh, _ in shards.collect(f"{root}/plan.json")))
    assert len(merged) == 1


def test_a_marker_made_under_other_settings_is_never_taken_for_done(tmp_path):
    root = str(tmp_path)
    spec = shards.plan(["a", "b"], 1, root, fingerprint="weights-0")[0]
    shards.run_shard(spec, _writer([]), "t")
    assert json.loads(storage.read_text(shards.load(spec).marker))["fingerprint"] == "weights-0"
    spec = shards.plan(["a", "b"], 1, root, fingerprint="weights-1")[0]  # same items, other settings
    with pytest.raises(VlprepError, match="does not match its marker or the plan"):
        shards.collect(spec["plan"])
    calls = []
    assert shards.run_shard(spec, _writer(calls), "t")["skipped"] is False and calls == [0]
    assert shards.run_shard(spec, _writer(calls), "t")["skipped"] is True and calls == [0]
    assert [m["fingerprint"] for _, m in shards.collect(spec["plan"])] == ["weights-1"]


@pytest.fixture
def reads(monkeypatch):
    """Every URI opened for reading (the store's one read path), in order."""
    seen: list[str] = []
    real = storage.open_read

    def counting(uri):
        seen.append(str(uri))
        return real(uri)

    monkeypatch.setattr(storage, "open_read", counting)
    return seen


def test_parts_are_hashed_as_written_and_collect_reads_the_plan_once(tmp_path, reads):
    specs = shards.plan([f"{i:03d}" for i in range(20)], 5, str(tmp_path))

    def work(shard):
        shard.write_part("rows.txt", "".join(f"{i}\n" for i in shard.items).encode())
        shard.save_array("n.npy", [len(shard.items)])
        return {"parts": ["rows.txt", "n.npy"], "failed": []}

    for s in specs:
        shards.run_shard(s, work, "t")
    assert not [u for u in reads if "shard-" in u and not u.endswith(".done.json")]  # no part read back to hash
    reads.clear()
    done = shards.collect(specs[0]["plan"])
    assert len(done) == 5 and reads.count(specs[0]["plan"]) == 1
    assert [u for u in reads if u != specs[0]["plan"]] == [sh.marker for sh, _ in done]  # markers only, no parts
    marker = done[0][1]
    assert marker["parts"][0]["sha256"] == storage.sha256(done[0][0].part("rows.txt"))
