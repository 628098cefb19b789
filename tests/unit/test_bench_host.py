"""``bench.host``: the yardstick and steal time in ``make bench``'s header."""

from __future__ import annotations

from pathlib import Path

from bench.host import HostWatch, cpu_ticks, describe, steal_pct, yardstick_ms


def write_stat(path: Path, user: int, idle: int, steal: int) -> Path:
    path.write_text(
        f"cpu  {user} 0 0 {idle} 0 0 0 {steal} 0 0\ncpu0 {user} 0 0 {idle} 0 0 0 {steal} 0 0\n"
    )
    return path


def test_steal_is_its_share_of_the_ticks_between_two_readings(tmp_path: Path) -> None:
    before = cpu_ticks(write_stat(tmp_path / "a", user=100, idle=100, steal=0))
    after = cpu_ticks(write_stat(tmp_path / "b", user=160, idle=120, steal=20))
    assert before == [100, 0, 0, 100, 0, 0, 0, 0, 0, 0]
    assert steal_pct(before, after) == 20.0


def test_no_proc_stat_means_no_steal_figure(tmp_path: Path) -> None:
    assert cpu_ticks(tmp_path / "absent") is None
    (tmp_path / "odd").write_text("intr 1 2 3\n")
    assert cpu_ticks(tmp_path / "odd") is None
    assert steal_pct(None, [1] * 10) is None
    assert steal_pct([1] * 10, [1] * 10) is None  # no ticks passed


def test_the_yardstick_is_a_wall_time_in_ms() -> None:
    # Its size is the host's business: no timing is asserted, only its kind.
    took = yardstick_ms(loops=10_000, passes=2)
    assert isinstance(took, float)
    assert took > 0


def test_the_header_line_says_both_yardsticks_and_the_steal() -> None:
    host = HostWatch().finish()
    assert set(host) == {"yardstick_ms", "steal_pct"}
    line = describe({"yardstick_ms": {"start": 143.4, "end": 150.0}, "steal_pct": 2.5})
    assert "143.4 ms at the start, 150 ms at the end" in line
    assert "steal 2.5 %" in line
    assert "steal" not in describe({"yardstick_ms": {"start": 1.0, "end": 1.0}, "steal_pct": None})
    assert describe(None) == ""  # a run recorded before the yardstick
