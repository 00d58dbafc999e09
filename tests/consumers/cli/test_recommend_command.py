"""`casm recommend`: the lists `casm serve` would publish, from a stopped service's store."""

from __future__ import annotations

from pathlib import Path

from consumers.cli.commands.recommend import recommend
from consumers.serve.service import open_store
from consumers.settings import CasmSettings
from tests.state._synth import events


def test_recommend_lists_as_the_service_publishes_them(tmp_path: Path) -> None:
    rows = [("p", "x", "pv")] * 3 + [("p", "y", "pv")] * 2 + [("p", "z", "pv"), ("u", "y", "pv"), ("u", "x", "buy")]
    base = {"store": {"path": tmp_path / "state.duckdb", "sequence_length": 6}, "model": {"max_len": 5}, "progress": False}
    with open_store(CasmSettings(**base)) as store:
        store.apply(events([{"user_id": u, "item_id": i, "behavior": b, "offset": n} for n, (u, i, b) in enumerate(rows)]))

    def lists(recommender: str) -> dict[str, tuple[str, list[str]]]:
        settings = CasmSettings(**base, serve={"recommender": recommender, "exclude_behaviours": ["buy"]})
        return {r["user_id"]: (r["source"], [i["item_id"] for i in r["items"]])
                for r in recommend(settings, ["u", "nobody"], 3)}

    assert lists("casm") == lists("popularity") == {  # no model: popularity, without u's bought x
        "u": ("popularity", ["y", "z"]), "nobody": ("popularity", ["x", "y", "z"])}
    assert lists("recent")["u"] == ("recent", ["y", "z"])
