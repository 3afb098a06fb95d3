from __future__ import annotations

import pytest

from fora_runtime import CacheSchedule, ScheduleError


def full_steps(schedule: CacheSchedule, steps: int) -> list[int]:
    return [k for k, full in enumerate(schedule.plan(steps)) if full]


def test_paper_interval_recomputes_every_n_from_the_first_step() -> None:
    assert full_steps(CacheSchedule.interval_of(3), 10) == [0, 3, 6, 9]
    assert full_steps(CacheSchedule.interval_of(5), 12) == [0, 5, 10]


def test_interval_one_is_no_caching() -> None:
    assert CacheSchedule.interval_of(1).plan(7) == (True,) * 7


def test_reference_reading_matches_fora_code_for_250_steps() -> None:
    # The FORA code counts i from S-1 down to 0 and recomputes when i == S-1 or i % N == 0.
    plan = CacheSchedule.interval_of(3, "reference").plan(250)
    assert sum(plan) == 84  # as in the paper's 250-step, N=3 runs
    expected = [k for k in range(250) if (249 - k) == 249 or (249 - k) % 3 == 0]
    assert full_steps(CacheSchedule.interval_of(3, "reference"), 250) == expected


def test_readings_differ_when_steps_minus_one_is_not_a_multiple_of_n() -> None:
    # S=50, N=3: i = 49 (k=0) is full, then i = 48 (k=1) since 48 % 3 == 0.
    reference = full_steps(CacheSchedule.interval_of(3, "reference"), 50)
    paper = full_steps(CacheSchedule.interval_of(3, "paper"), 50)
    assert reference[:3] == [0, 1, 4]
    assert reference[-1] == 49
    assert len(reference) == 18
    assert paper[:3] == [0, 3, 6]
    assert len(paper) == 17


def test_readings_agree_when_steps_minus_one_is_a_multiple_of_n() -> None:
    assert CacheSchedule.interval_of(3, "reference").plan(250) == CacheSchedule.interval_of(3).plan(250)


def test_explicit_schedule() -> None:
    schedule = CacheSchedule.explicit([0, 4, 2])
    assert full_steps(schedule, 6) == [0, 2, 4]
    assert schedule.ideal_speedup(6) == 2.0


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "3"])
def test_interval_must_be_a_positive_integer(bad: object) -> None:
    with pytest.raises(ScheduleError, match="expected an integer >= 1"):
        CacheSchedule.interval_of(bad)  # type: ignore[arg-type]


def test_unknown_mode_is_refused() -> None:
    with pytest.raises(ScheduleError, match="expected one of paper, reference"):
        CacheSchedule.interval_of(3, "backwards")


def test_explicit_schedule_must_start_full() -> None:
    with pytest.raises(ScheduleError, match="step 0 must be full"):
        CacheSchedule.explicit([1, 3])
    with pytest.raises(ScheduleError, match="no full steps"):
        CacheSchedule.explicit([])


def test_explicit_steps_must_lie_inside_the_generation() -> None:
    with pytest.raises(ScheduleError, match="past the last step"):
        CacheSchedule.explicit([0, 10]).plan(5)


@pytest.mark.parametrize("steps", [0, -3])
def test_plan_needs_at_least_one_step(steps: int) -> None:
    with pytest.raises(ScheduleError, match="expected an integer >= 1"):
        CacheSchedule.interval_of(3).plan(steps)


def test_round_trips_through_manifest_dict() -> None:
    for schedule in (CacheSchedule.interval_of(5, "reference"), CacheSchedule.explicit([0, 7])):
        assert CacheSchedule.from_dict(schedule.to_dict()) == schedule
