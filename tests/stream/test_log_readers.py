"""Historical log readers: each native layout, malformed rows, and the shared data sets."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest

from stream.logs import LogFormatError, read_heldout, read_log


def write(path: Path, text: str) -> Path:
    if path.suffix == ".gz":
        with gzip.open(path, "wt", encoding="utf-8") as handle:
            handle.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def rows(loaded) -> list[tuple]:
    table = loaded.events.to_pydict()
    return list(zip(table["user_id"], table["item_id"], table["behavior"], table["timestamp"], strict=False))


def test_generic_csv_gz_sorted_stably_by_time(tmp_path: Path) -> None:
    write(
        tmp_path / "events.csv.gz",
        "user_id,item_id,behavior,timestamp,extra\n"
        "u1,i1,pv,20,x\nu2,i2,buy,10,y\nu1,i3,cart,20,z\n",
    )
    loaded = read_log(tmp_path, "generic")  # a folder means events.csv.gz
    assert rows(loaded) == [("u2", "i2", "buy", 10.0), ("u1", "i1", "pv", 20.0), ("u1", "i3", "cart", 20.0)]


def test_taobao_native_layout_drops_category(tmp_path: Path) -> None:
    path = write(tmp_path / "UserBehavior.csv", "1,2268318,2520377,pv,1511544070\n1,2333346,2520771,buy,1511561733\n")
    assert rows(read_log(path, "taobao")) == [
        ("1", "2268318", "pv", 1511544070.0),
        ("1", "2333346", "buy", 1511561733.0),
    ]


def test_movielens_udata_maps_ratings(tmp_path: Path) -> None:
    write(tmp_path / "u.data", "196\t242\t3\t881250949\n186\t302\t5\t891717742\n22\t377\t1\t878887116\n")
    loaded = read_log(tmp_path, "movielens")
    assert [r[2] for r in rows(loaded)] == ["dislike", "neutral", "like"]


def test_movielens_1m_dat_layout(tmp_path: Path) -> None:
    path = write(tmp_path / "ratings.dat", "1::1193::5::978300760\n1::661::2::978302109\n")
    assert [r[2] for r in rows(read_log(path, "movielens"))] == ["like", "dislike"]


def test_retailrocket_milliseconds_and_events(tmp_path: Path) -> None:
    path = write(
        tmp_path / "events.csv",
        "timestamp,visitorid,event,itemid,transactionid\n1433221332117,257597,view,355908,\n"
        "1433224214164,992329,transaction,248676,4000\n",
    )
    assert rows(read_log(path, "retailrocket")) == [
        ("257597", "355908", "view", 1433221332.117),
        ("992329", "248676", "transaction", 1433224214.164),
    ]


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("user_id,item_id,behavior,timestamp\nu1,i1,pv,10\nu1,i2,pv\n", "expected 4 fields"),
        ("user_id,item_id,behavior,timestamp\nu1,i1,pv,10\nu1,,pv,11\n", "empty item_id"),
        ("user_id,item_id,behavior,timestamp\nu1,i1,pv,10\nu1,i2,pv,soon\n", "could not convert"),
        ("user_id,item_id,behavior,timestamp\nu1,i1,pv,10\nu1,i2,pv,-5\n", "non-negative"),
    ],
)
def test_malformed_row_names_file_and_line(tmp_path: Path, text: str, reason: str) -> None:
    path = write(tmp_path / "bad.csv", text)
    with pytest.raises(LogFormatError, match=rf"bad\.csv:3: .*{reason}"):
        read_log(path, "generic")
    loaded = read_log(path, "generic", skip_malformed=True)
    assert loaded.num_events == 1 and loaded.rows_skipped == 1
    assert "bad.csv:3" in loaded.skipped_examples[0]


def test_missing_header_columns_and_unknown_taobao_behaviour(tmp_path: Path) -> None:
    with pytest.raises(LogFormatError, match="lacks columns"):
        read_log(write(tmp_path / "a.csv", "user,item\n1,2\n"), "generic")
    with pytest.raises(LogFormatError, match=r"b\.csv:2: unknown behavior_type 'click'"):
        read_log(write(tmp_path / "b.csv", "1,2,3,pv,10\n1,2,3,click,11\n"), "taobao")
    with pytest.raises(ValueError, match="unknown log format"):
        read_log(tmp_path / "a.csv", "parquet")
    with pytest.raises(FileNotFoundError):
        read_log(tmp_path / "nope.csv", "generic")


def test_heldout_reader(tmp_path: Path) -> None:
    path = write(tmp_path / "heldout.csv.gz", "user_id,item_id\n3,7\n4,9\n")
    assert read_heldout(path).to_pydict() == {"user_id": ["3", "4"], "item_id": ["7", "9"]}
    with pytest.raises(LogFormatError, match="heldout2.csv:3"):
        read_heldout(write(tmp_path / "heldout2.csv", "user_id,item_id\n3,7\n4\n"))


@pytest.mark.parametrize(
    ("name", "events", "users"),
    [("movielens_100k", 100_000, 943), ("taobao_users", 14_188, 155)],
)
def test_shared_logs_match_their_source_counts(data_dir: Path, name: str, events: int, users: int) -> None:
    loaded = read_log(data_dir / name, "generic")
    assert loaded.num_events == events
    assert len(set(loaded.events.column("user_id").to_pylist())) == users
