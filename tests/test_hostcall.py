"""engines.hostcall: Kasa's pure engines code served by one python3 on a host, locally and over a real sshd in a
network namespace (tests/hosts.py)."""

from __future__ import annotations

import os
import sys

import pytest

from engines import hostcall, ssh
from engines.secretbox import Secret


def _local() -> hostcall.HostSession:
    return hostcall.HostSession(hostcall.HostSession.boot_argv(sys.executable), where="this machine", timeout=20)


@pytest.mark.smoke
def test_a_host_session_runs_engines_functions_shipped_in_memory_and_returns_their_results(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").write_text("x")
    with _local() as host:
        assert host.call("engines.beneath.is_dir", str(tmp_path), str(tmp_path / "a")) is True
        assert host.call("engines.beneath.is_dir", str(tmp_path), str(tmp_path / "b")) is False
        # The engines it ran came from the bundle, in memory, not from a checkout on the host.
        assert "origin='kasa-bundle:engines/beneath.py'" in host.call("importlib.util.find_spec", "engines.beneath")
        assert host.call("os.getpid") != os.getpid()


@pytest.mark.smoke
def test_an_exception_on_the_host_comes_back_by_name_with_its_errno_and_the_session_goes_on(tmp_path):
    link = tmp_path / "l"
    link.symlink_to("/etc")
    with _local() as host:
        with pytest.raises(hostcall.HostCallError) as failed:
            host.call("engines.beneath.is_dir", str(tmp_path), str(link / "x"))
        assert failed.value.type == "LinkRefused" and "on this machine" in str(failed.value)
        with pytest.raises(hostcall.HostCallError) as missing:
            host.call("os.rmdir", str(tmp_path / "nope"))
        assert missing.value.type == "FileNotFoundError" and missing.value.errno == 2
        assert host.call("os.path.isdir", str(tmp_path)) is True  # still serving


@pytest.mark.smoke
def test_what_the_called_code_prints_never_reaches_the_protocol():
    with _local() as host:
        assert host.call("builtins.print", "not a protocol line") is None
        assert host.call("os.system", "echo from a child process; echo '{\"id\": 99, \"ok\": true}'") == 0
        assert host.call("os.getcwd")


@pytest.mark.smoke
def test_an_answer_that_is_not_the_helpers_is_refused_and_a_dead_helper_is_a_lost_session():
    fake = [sys.executable, "-c", "import sys; sys.stdin.buffer.readline(); print('{\"id\": 7, \"ok\": true}')"]
    with hostcall.HostSession(fake, where="a fake host", timeout=10, payload=b"") as host:
        with pytest.raises(hostcall.HostCallError, match="not Kasa's helper"):
            host.call("os.getpid")
    with _local() as host:
        with pytest.raises(hostcall.HostLost, match="the session ended"):
            host.call("os._exit", 3)


def test_a_host_session_over_ssh_runs_on_the_simulated_host_and_ends_as_lost_when_its_connection_is_cut(
        netns_hosts, tmp_path):
    h = netns_hosts.make()
    target = ssh.Target(name="web9", user="root", address=h.address, port=h.port, host_key=h.host_public,
                        private_key=Secret(h.client_private), connect_timeout=3)
    (h.customers_root / "shop").mkdir()
    with ssh.Session(target, tmp_path / "ssh") as session:
        argv = session.argv(hostcall.HostSession.boot_argv())
        with hostcall.HostSession(argv, where=target.where(), timeout=20) as host:
            assert host.call("engines.beneath.is_dir", str(h.customers_root), str(h.customers_root / "shop"))
            # The host is another network namespace: its own interfaces, not the worker's.
            assert sorted(name for _, name in host.call("socket.if_nameindex")) == ["eth0", "lo"]
            h.kill_sessions()
            with pytest.raises(hostcall.HostLost, match="web9"):
                host.call("os.getpid")


@pytest.mark.smoke
def test_old_private_sqlite_copies_are_swept_and_fresh_ones_and_others_files_kept(tmp_path, monkeypatch):
    import time

    from engines import hostside

    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the helper's tempfile and /var/tmp: both looked at
    with _local() as host:
        old = host.call("engines.hostside.private_copy_dir")
        fresh = host.call("engines.hostside.private_copy_dir")
        assert os.path.basename(old).startswith(hostside.COPY_PREFIX) and (os.stat(old).st_mode & 0o777) == 0o700
        other = tmp_path / "kasa-sqlite-not-a-folder"
        other.write_text("x")
        past = time.time() - hostside.COPY_MAX_AGE - 60
        os.utime(old, (past, past))
        os.utime(other, (past, past))
        assert host.call("engines.hostside.sweep_copy_dirs") == [old]
        assert os.path.isdir(fresh) and other.exists()
        assert host.call("engines.hostside.remove_copy_dir", fresh) is True and not os.path.exists(fresh)
        assert host.call("engines.hostside.remove_copy_dir", str(tmp_path)) is False and tmp_path.is_dir()
