"""`amygdala memory add|list|show|stats|export|repair` through typer's CliRunner."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from networkx.readwrite import json_graph
from typer.testing import CliRunner

from amygdala.memory_graph import MemoryGraph
from amygdala.memory_graph.cli import app, default_graph_dir

runner = CliRunner()


def run(*args: str, input: str | None = None):  # type: ignore[no-untyped-def]
    return runner.invoke(app, list(args), input=input)


@pytest.fixture()
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("AMYGDALA_HOME", str(tmp_path / "home"))
    return tmp_path / "home" / "memory"


def test_default_dir_follows_amygdala_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("AMYGDALA_HOME", str(tmp_path / "x"))
    assert default_graph_dir() == tmp_path / "x" / "memory"
    monkeypatch.delenv("AMYGDALA_HOME")
    assert default_graph_dir() == Path("~/.local/share/amygdala/memory").expanduser()


@pytest.mark.parametrize("command", ["add", "list", "show", "stats", "export", "repair"])
def test_every_command_has_help(command: str) -> None:
    result = run(command, "--help")
    assert result.exit_code == 0 and "--dir" in result.output


def test_add_list_show_stats(home: Path) -> None:
    r = run("add", "Tests failed again\nemotion: frustrated=0.7 curious=0.4", "--tag", "ci", "--json")
    assert r.exit_code == 0, r.output
    mem = json.loads(r.stdout)
    assert mem["emotions"] == {"curious": 0.4, "frustrated": 0.7} and mem["tags"] == ["ci"] and mem["source"] == "cli"
    assert (home / "journal.log").exists()

    r = run("add", "--kind", "invariant", "--name", "honest", "--description", "No invented facts", "--judge", "regex",
            "--judge-param", 'pattern="lie"', "--judge-param", "flags=2", "--threshold", "0.9", "--template", "Q {x}")
    assert r.exit_code == 0, r.output
    r = run("add", "-k", "correction", "--context", "asked X", "--preferred", "I don't know", "--rejected", "made up",
            "--invariant", "honest", "--key", "req-1", "--json")
    cor = json.loads(r.stdout)
    again = run("add", "-k", "correction", "--context", "asked X", "--preferred", "I don't know", "--rejected",
                "made up", "--invariant", "honest", "--key", "req-1", "--json")
    assert json.loads(again.stdout)["id"] == cor["id"]

    listed = json.loads(run("list", "--json").stdout)
    assert [n["kind"] for n in listed] == ["memory", "invariant", "correction"]
    assert [n["id"] for n in json.loads(run("list", "--status", "pending", "--json").stdout)] == [cor["id"]]
    assert json.loads(run("list", "--tag", "ci", "--json").stdout)[0]["id"] == mem["id"]
    assert "honest" in run("list").stdout

    shown = json.loads(run("show", cor["id"], "--json").stdout)
    assert shown["node"]["invariant_id"] == shown["edges"][0]["target"] and shown["edges"][0]["kind"] == "about"
    inv = json.loads(run("show", "honest", "--json").stdout)["node"]
    assert inv["judge"] == {"kind": "regex", "params": {"pattern": "lie", "flags": 2}}
    text = run("show", mem["id"]).stdout
    assert "| emotion: frustrated=0.7 curious=0.4" in text

    stats = json.loads(run("stats", "--json").stdout)
    assert stats["nodes_by_kind"] == {"correction": 1, "invariant": 1, "memory": 1}
    assert stats["corrections_by_status"] == {"pending": 1}
    assert "3 nodes" in run("stats").stdout


def test_bad_input_is_explained_and_nothing_is_stored(home: Path) -> None:
    assert run("add", "fine").exit_code == 0
    r = run("add", "bad one\nemotion: frustrated=O.7")
    assert r.exit_code == 2 and "line 2" in r.stderr and "frustrated=0.7" in r.stderr
    r = run("add", "--time", "2025-01-01T10:00:00", "x")
    assert r.exit_code == 2 and "time zone" in r.stderr
    r = run("add", "-k", "correction", "--context", "c")
    assert r.exit_code == 2 and "--preferred" in r.stderr
    r = run("add", "-k", "correction", "--context", "c", "--preferred", "p", "--invariant", "nope")
    assert r.exit_code == 2 and "not an existing invariant" in r.stderr
    r = run("add", "x", "--link", "likes:abc")
    assert r.exit_code == 2 and "KIND:ID" in r.stderr
    r = run("show", "nope")
    assert r.exit_code == 1 and "no node" in r.stderr
    assert len(json.loads(run("list", "--json").stdout)) == 1


def test_list_on_a_missing_graph_says_how_to_create_one(tmp_path: Path) -> None:
    r = run("list", "--dir", str(tmp_path / "none"))
    assert r.exit_code == 1 and "amygdala memory add" in r.stderr
    assert not (tmp_path / "none").exists()


def test_add_from_stdin_and_node_json(tmp_path: Path) -> None:
    d = tmp_path / "g"
    assert run("add", "-", "--dir", str(d), input="from stdin\nemotion: calm=0.3\n").exit_code == 0
    inv = json.loads(run("add", "--dir", str(d), "-k", "invariant", "--name", "r", "--description", "d", "--judge",
                         "llm", "--threshold", "0.8", "--json").stdout)
    node = {"kind": "scenario", "invariant_id": inv["id"], "prompt": "Say hi", "variables": {"x": "1"}}
    r = run("add", "--dir", str(d), "--node-json", "-", "--link", f"derived_from:{inv['id']}", "--json",
            input=json.dumps(node))
    assert r.exit_code == 0, r.output
    with MemoryGraph(d, readonly=True) as g:
        scn = g.get(json.loads(r.stdout)["id"])
        assert scn.kind == "scenario" and [e.target for e in g.edges(scn.id)] == [inv["id"]]
        assert g.nodes("memory")[0].emotions == {"calm": 0.3}  # type: ignore[union-attr]


def test_export_node_link_jsonl_and_training(tmp_path: Path) -> None:
    d = tmp_path / "g"
    run("add", "--dir", str(d), "up\nemotion: frustrated=0.9")
    run("add", "--dir", str(d), "down\nemotion: frustrated=0.1")
    run("add", "--dir", str(d), "-k", "correction", "--context", "c", "--preferred", "p", "--rejected", "r")
    r = run("export", "--dir", str(d))
    g = json_graph.node_link_graph(json.loads(r.stdout), edges="edges", multigraph=True, directed=True)
    assert g.number_of_nodes() == 3
    out = tmp_path / "g.jsonl"
    assert run("export", "--dir", str(d), "--format", "jsonl", "-o", str(out)).exit_code == 0
    assert [list(json.loads(line)) for line in out.read_text().splitlines()] == [["node"]] * 3

    train = tmp_path / "train"
    r = run("export", "--dir", str(d), "--format", "training", "-o", str(train), "--threshold", "frustrated=0.6:0.2")
    assert r.exit_code == 0, r.output
    assert len((train / "emotion_examples.jsonl").read_text().splitlines()) == 2
    assert json.loads((train / "orpo_triplets.jsonl").read_text())["chosen"] == "p"
    r = run("export", "--dir", str(d), "--format", "training", "-o", str(train), "--threshold", "frustrated=0.2:0.6")
    assert r.exit_code == 2 and "below positive" in r.stderr
    r = run("export", "--dir", str(d), "--format", "training", "--threshold", "frustrated=0.6:0.2")
    assert r.exit_code == 2 and "--out" in r.stderr


def test_repair_healthy_and_damaged(tmp_path: Path) -> None:
    d = tmp_path / "g"
    for text in ("a", "b", "c"):
        run("add", "--dir", str(d), text)
    r = run("repair", "--dir", str(d))
    assert r.exit_code == 0 and "nothing to repair" in r.stdout
    lines = (d / "journal.log").read_bytes().splitlines(keepends=True)
    lines[2] = lines[2].replace(b'"b', b'"B')
    (d / "journal.log").write_bytes(b"".join(lines))
    r = run("list", "--dir", str(d))
    assert r.exit_code == 1 and "amygdala memory repair" in r.stderr
    r = run("repair", "--dir", str(d), "--dry-run", "--json")
    report = json.loads(r.stdout)
    assert r.exit_code == 1 and report["dry_run"] and report["backup"] is None and len(report["lost"]) == 1
    r = run("repair", "--dir", str(d))
    assert r.exit_code == 1 and "not kept: journal.log: journal line 3" in r.stdout and "backed up" in r.stdout
    assert [n["text"] for n in json.loads(run("list", "--dir", str(d), "--json").stdout)] == ["a", "c"]
