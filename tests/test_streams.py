"""Process chains and writer stacks (engines/streams.py, engines/sources.py), without Django."""

import io
import os
import subprocess
import sys
import tarfile

import pytest

from engines import sources
from engines.streams import ChainError, HashingWriter, ProcessChain, Stage, ThrottledWriter

pytestmark = pytest.mark.smoke


def test_chain_pipes_tar_through_zstd_and_streams_in_chunks(tmp_path):
    (tmp_path / "svc" / "logs").mkdir(parents=True)
    (tmp_path / "svc" / "a.txt").write_text("hello\n" * 1000)
    (tmp_path / "svc" / "logs" / "x.log").write_text("noise")
    chain = ProcessChain([sources.tar_stage(str(tmp_path), ["svc"], excludes=sources.DEFAULT_EXCLUDES),
                          sources.compressor_stage("zstd")])
    out = io.BytesIO()
    with chain:
        for chunk in chain.chunks(4096):
            assert len(chunk) <= 4096
            out.write(chunk)
        assert chain.finish() == [0, 0]
    raw = subprocess.run(["zstd", "-d", "-c"], input=out.getvalue(), capture_output=True, check=True).stdout
    names = tarfile.open(fileobj=io.BytesIO(raw)).getnames()
    assert "svc/a.txt" in names and not any("logs" in n for n in names)
    assert chain.bytes_out == len(out.getvalue())


def test_a_failing_stage_is_named_with_its_last_stderr_line():
    chain = ProcessChain([Stage([sys.executable, "-c", "import sys; sys.stderr.write('boom: disk on fire\\n');"
                                 " sys.exit(3)"], name="dumper"), Stage(["cat"])])
    with chain:
        list(chain.chunks())
        with pytest.raises(ChainError, match=r"dumper failed \(exit code 3\): boom: disk on fire"):
            chain.finish()


def test_chatty_stderr_is_drained_and_bounded():
    noisy = "import sys\nfor i in range(200000): sys.stderr.write('warning %d\\n' % i)\nprint('done')"
    chain = ProcessChain([Stage([sys.executable, "-c", noisy], name="noisy")])
    with chain:
        assert b"".join(chain.chunks()).strip() == b"done"
        chain.finish()
    assert len(chain.stages[0].stderr_tail) == 50 and chain.stages[0].stderr_tail[-1] == "warning 199999"


def test_leaving_early_kills_every_stage():
    chain = ProcessChain([Stage(["yes"]), Stage(["cat"])])
    with pytest.raises(RuntimeError):
        with chain:
            next(chain.chunks(10))
            raise RuntimeError("downstream failed")
    assert all(p.poll() is not None for p in chain.procs)


def test_missing_program_is_a_chain_error():
    with pytest.raises(ChainError, match="command not found"):
        with ProcessChain([Stage(["no-such-tool-kasa"])]):
            pass


def test_throttle_holds_the_average_rate_and_hashing_counts_stored_bytes():
    clock = {"t": 0.0}
    slept = []

    def sleep(s):
        slept.append(s)
        clock["t"] += s

    sink = io.BytesIO()
    hashing = HashingWriter(ThrottledWriter(sink, 1000, clock=lambda: clock["t"], sleep=sleep))
    for _ in range(10):
        hashing.write(b"x" * 500)
    assert hashing.size == 5000 and sink.getvalue() == b"x" * 5000
    assert clock["t"] == pytest.approx(5.0)  # 5000 bytes at 1000 B/s
    import hashlib

    assert hashing.hexdigest() == hashlib.sha256(b"x" * 5000).hexdigest()


def test_config_members_finds_env_and_pm2_files_but_not_symlinks(tmp_path):
    (tmp_path / "backend").mkdir()
    (tmp_path / ".env").write_text("A=1")
    (tmp_path / "backend" / ".env.production").write_text("B=2")
    (tmp_path / "ecosystem.config.js").write_text("x")
    (tmp_path / "backend" / "notes.txt").write_text("no")
    os.symlink("/etc/passwd", tmp_path / "backend" / ".env.evil")
    assert sources.config_members(str(tmp_path), ["backend"]) == [
        ".env", "ecosystem.config.js", "backend/.env.production"]


def test_pg_client_older_than_the_server_is_refused():
    tools = sources.pg_tools("pg_dump")
    assert tools, "no pg_dump installed"
    newest = tools[0][0]
    assert sources.pg_tool_for(newest)[0] == tools[0][1]
    with pytest.raises(sources.SourceError, match=f"pg_dump {newest} cannot dump a PostgreSQL {newest + 1}"):
        sources.pg_tool_for(newest + 1)


def test_embedded_pg_dump_18_is_available():
    assert sources.pg_tools("pg_dump")[0][0] >= 18
