"""Row counts of a MySQL/MariaDB backup are taken from the dump itself (engines/sqlcount.py).

A real mariadb-dump of tricky data is counted and compared with COUNT(*): strings that look like row
separators, quotes, backslashes and newlines, binary data with hex bytes of '(' and ')', a backtick in a
table name, an empty table, and trigger and procedure bodies that contain INSERT statements (code, not
rows). One row larger than the counter's line limit is scanned in pieces.
"""

from __future__ import annotations

import json

import pytest

from engines import credentials, sources, sqlcount
from engines.streams import ProcessChain
from tests.conftest import mysql_admin

TRICKY = [
    "x),(y", "it's", "back\\slash", "line\nbreak", "tab\there", "((((", "'),('", "\\'", "",
    "ünïcödé ✓", "a" * 3000,
]


@pytest.fixture
def tricky_database(mysql_database):
    m = mysql_database
    db = f"`{m['name']}`"
    values = ",".join("(" + _sql_string(s) + ")" for s in TRICKY)
    mysql_admin(
        f"CREATE TABLE {db}.notes (id INT PRIMARY KEY AUTO_INCREMENT, body TEXT, raw MEDIUMBLOB); "
        f"INSERT INTO {db}.notes (body) VALUES {values}; "
        f"INSERT INTO {db}.notes (body, raw) VALUES (NULL, 0x28293B0A27), ('big', REPEAT(0x2829, 40000)); "
        f"CREATE TABLE {db}.`we``ird` (n INT); INSERT INTO {db}.`we``ird` VALUES (1),(2),(3); "
        f"CREATE TABLE {db}.empty_one (n INT); "
        f"CREATE TABLE {db}.audit (n INT); "
        f"CREATE DEFINER='{m['user']}'@'%' TRIGGER {db}.notes_ai AFTER INSERT ON {db}.notes FOR EACH ROW\n"
        f"INSERT INTO `audit` VALUES (NEW.id); "
        f"CREATE DEFINER='{m['user']}'@'%' PROCEDURE {db}.fill()\nINSERT INTO `audit` VALUES (1),(2); "
        f"CREATE VIEW {db}.v AS SELECT id FROM {db}.notes;"
    )
    return m


def _sql_string(s: str) -> str:
    return "'" + s.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n").replace("\t", "\\t") + "'"


def _dump(m: dict) -> tuple[bytes, dict[str, int]]:
    with credentials.mysql_defaults_file(host=m["host"], port=m["port"], user=m["user"],
                                         password=m["password"]) as cnf:
        expected = sources.mysql_row_counts(cnf, m["name"])
        with ProcessChain([sources.mysql_dump_stage(cnf, m["name"])]) as chain:
            data = b"".join(chain.chunks())
            chain.finish()
    return data, expected


def test_rows_counted_in_a_real_mariadb_dump_match_count_star(tricky_database):
    data, expected = _dump(tricky_database)
    assert expected == {"notes": len(TRICKY) + 2, "we`ird": 3, "empty_one": 0, "audit": 0}
    assert b"INSERT INTO `audit` VALUES (1),(2)" in data  # the procedure body is in the dump: not rows
    counter = sqlcount.RowCounter()
    for i in range(0, len(data), 4093):  # odd chunk sizes: lines and strings cross chunk boundaries
        counter.feed(data[i:i + 4093])
    assert counter.close() == expected


def test_an_over_long_row_is_counted_in_pieces(tricky_database, monkeypatch):
    data, expected = _dump(tricky_database)
    monkeypatch.setattr(sqlcount, "LINE_LIMIT", 4096)  # the 80 kB blob row and the 3 kB string exceed it
    counter = sqlcount.RowCounter()
    for i in range(0, len(data), 1000):
        counter.feed(data[i:i + 1000])
    assert counter.close() == expected
    assert max(len(line) for line in data.split(b"\n")) > 4096


def test_the_counting_stage_passes_the_dump_through_unchanged(tricky_database, tmp_path):
    data, expected = _dump(tricky_database)
    counts = tmp_path / "counts.json"
    source = tmp_path / "dump.sql"
    source.write_bytes(data)
    with ProcessChain([sources.mysql_count_stage(str(counts))], stdin_path=str(source)) as chain:
        out = b"".join(chain.chunks())
        chain.finish()
    assert out == data
    assert json.loads(counts.read_text()) == expected


def test_missing_counts_are_a_clear_error(tmp_path):
    with pytest.raises(sources.SourceError, match="row counts of the dump are missing"):
        sources.read_counts(str(tmp_path / "counts.json"))


SYNTHETIC = b"""CREATE TABLE `a` (
  `id` int NOT NULL,
  `s` text
);
INSERT INTO `a` VALUES (1,'x),(y'),(2,'it\\'s \\\\'),(3,NULL),(4,'(('),(5,0x28293B);
INSERT INTO `a` VALUES
(6,'a\\nb'),
(7,';'),
(8,'x;');
CREATE TABLE `empty` (
  `id` int
);
CREATE TABLE `we``ird` (
  `id` int
);
INSERT INTO `we``ird` VALUES (1),(2);
DELIMITER ;;
/*!50003 CREATE*/ /*!50003 TRIGGER `t1` AFTER INSERT ON `a` FOR EACH ROW
INSERT INTO `a` VALUES (NEW.id) */;;
DELIMITER ;
/*!50001 CREATE VIEW `v` AS SELECT 1 AS `x` */;
"""


@pytest.mark.parametrize("limit", [24, 40, 100, 16 << 20])
def test_counts_follow_statements_across_lines_chunks_and_long_rows(monkeypatch, limit):
    """mysqldump writes a table's rows on one line, mariadb-dump one row per line; chunks end anywhere."""
    import random

    monkeypatch.setattr(sqlcount, "LINE_LIMIT", limit)
    rnd = random.Random(limit)
    for _ in range(50):
        counter, pos = sqlcount.RowCounter(), 0
        while pos < len(SYNTHETIC):
            k = rnd.randint(1, 40)
            counter.feed(SYNTHETIC[pos:pos + k])
            pos += k
        assert counter.close() == {"a": 8, "empty": 0, "we`ird": 2}
