"""The sweep's policy (trainer/sweep/policy.py): which trial to promote or start, decided on plain
records without a process, Optuna or MLflow; a whole sweep played out against a real ledger."""

from __future__ import annotations

from pathlib import Path

from budgets.ledger import SweepLedger, TrialState
from trainer.sweep.policy import Promote, Start, SweepPolicy
from trainer.sweep.record import RungRecord, TrialRecord

PAUSED, RUNNING, FAILED = TrialState.PAUSED, TrialState.RUNNING, TrialState.FAILED
RUNGS = (8, 16, 32)


def policy(
    rungs: tuple[int, ...] = RUNGS, maximize: bool = True, parallel: int = 2,
    max_trials: int | None = None,
) -> SweepPolicy:  # fmt: skip
    return SweepPolicy(rungs, 2, maximize, parallel, max_trials)


def trial(
    number: int, values: list[float | None], state: TrialState, costs: list[int] | None = None
) -> TrialRecord:
    """A trial that ran len(values) rungs, spending each rung's budget unless ``costs`` say."""
    spent = costs or list(RUNGS[: len(values)])
    results = [RungRecord(RUNGS[i], spent[i], v, "BUDGET_REACHED", 10 * (i + 1))
               for i, v in enumerate(values)]  # fmt: skip
    rung = max(len(values) - 1, 0)
    return TrialRecord(number, {}, f"ICN{number}", f"ICN{number}", f"/runs/{number}", rung, state,
                       results=results)  # fmt: skip


def test_a_free_slot_goes_to_the_best_paused_trial_of_the_highest_rung_due() -> None:
    trials = [
        trial(0, [0.5], PAUSED), trial(1, [0.9], PAUSED), trial(2, [0.7], PAUSED),
        trial(3, [0.8], PAUSED),
        trial(4, [0.6, 0.95], PAUSED), trial(5, [0.55, 0.6], PAUSED),
    ]  # fmt: skip
    # Rung 1 has two results: the best half (trial 4) goes on to rung 2 before anything else.
    assert policy().next(trials, available=100, started=6) == Promote(4, 2, 32)
    # Without it, rung 0's best half of six (1, 3, 2) are due; 4 and 5 ran on already.
    assert policy().next(trials[:4], available=100, started=4) == Promote(1, 1, 16)
    assert policy(maximize=False).next(trials[:4], 100, 4) == Promote(0, 1, 16)


def test_a_promotion_needs_only_its_extra_grant_and_the_next_candidate_may_fit() -> None:
    # Trial 1 converged early at rung 0 on record, cost 3: its promotion needs 13; trial 3's, 8.
    trials = [trial(0, [0.5], PAUSED), trial(1, [0.9], PAUSED, costs=[3]),
              trial(2, [0.7], PAUSED), trial(3, [0.8], PAUSED)]  # fmt: skip
    assert policy().next(trials, available=13, started=4) == Promote(1, 1, 16)
    assert policy().next(trials, available=12, started=4) == Promote(3, 1, 16)  # 13 won't fit
    assert policy().next(trials, available=7, started=4) is None  # nothing fits: wait
    trials[1].state = RUNNING  # promoted meanwhile: the next of the best half
    assert policy().next(trials, available=100, started=4) == Promote(3, 1, 16)
    trials[3].state = RUNNING
    assert policy().next(trials, available=100, started=4) == Start(8)  # 2 is not in the best half


def test_a_new_trial_starts_only_within_the_budget_and_the_trials_to_ask() -> None:
    assert policy().next([], available=8, started=0) == Start(8)
    assert policy().next([], available=7, started=0) is None
    assert policy(max_trials=3).next([], available=100, started=3) is None  # or a grid's size
    assert policy(max_trials=3).next([], available=100, started=2) == Start(8)
    one_rung = policy(rungs=(16,))  # sweep.pruning=none: never a promotion
    assert one_rung.next([trial(0, [0.9], TrialState.DONE)], 100, 1) == Start(16)


def test_too_early_to_tell_and_failed_results_promote_nothing() -> None:
    assert policy().next([trial(0, [0.9], PAUSED)], available=100, started=1) == Start(8)
    trials = [trial(0, [None], FAILED), trial(1, [None], FAILED), trial(2, [0.4], PAUSED)]
    assert policy().next(trials, available=100, started=3) == Start(8)  # one result of three


def test_an_ended_trial_settles_by_its_rung_and_the_sweeps_stop() -> None:
    decide = policy().settled_state
    assert decide(PAUSED, 0, stopping=False) is PAUSED
    assert decide(PAUSED, 2, stopping=False) is TrialState.DONE  # the last rung
    assert decide(PAUSED, 2, stopping=True) is TrialState.DONE
    assert decide(PAUSED, 1, stopping=True) is TrialState.CANCELLED
    assert decide(TrialState.CONVERGED, 0, stopping=True) is TrialState.CONVERGED
    assert decide(FAILED, 1, stopping=False) is FAILED


def test_the_sweep_gives_up_when_its_last_trials_all_failed() -> None:
    failed = [trial(n, [None], FAILED) for n in range(3)]
    assert policy().gave_up(failed[:2]) == []  # too few to tell
    assert policy().gave_up(failed) == failed
    assert policy(parallel=4).gave_up(failed) == []  # the window is max(3, parallel)
    assert policy().gave_up([*failed, trial(3, [0.5], PAUSED)]) == []
    assert policy().gave_up([trial(9, [0.5], PAUSED), *failed]) == []  # by number, not order
    running = TrialRecord(4, {}, "ICN4", "ICN4", "/runs/4")  # no result yet: not counted
    assert policy().gave_up([*failed, running]) == failed


def test_a_whole_sweep_decided_without_a_process_stays_within_its_ledger(tmp_path: Path) -> None:
    """Rungs 8, 16, 32 and a total of 100: each decision is carried out at once against a real
    ledger, and each trial ends its rung at once, with a metric that is its number's (higher is
    better): each new trial is the best so far, and goes on as far as the budget allows."""
    ledger = SweepLedger.create(tmp_path / "ledger.json", 100)
    chosen, trials, started = policy(), {}, 0
    log = []
    while True:
        decision = chosen.next(list(trials.values()), ledger.available(), started)
        if decision is None:
            break
        if isinstance(decision, Start):
            number, started = started, started + 1
            assert ledger.admit(str(number), decision.limit)
            trials[number] = TrialRecord(number, {}, f"ICN{number}", f"ICN{number}", "")
        else:
            number = decision.trial
            assert ledger.admit(str(number), decision.limit)
            trials[number].rung, trials[number].state = decision.rung, RUNNING
        log.append(decision)
        ended = trials[number]  # its rung ends: cost its whole grant, metric its number
        cost = RUNGS[ended.rung]
        ended.results = [*ended.results, RungRecord(cost, cost, float(number), "", 1)]
        ended.state = chosen.settled_state(PAUSED, ended.rung, stopping=False)
        ledger.settle(str(number), cost, ended.state)
    assert log == [
        Start(8), Start(8), Promote(1, 1, 16), Start(8), Promote(2, 1, 16), Promote(2, 2, 32),
        Start(8), Promote(3, 1, 16), Promote(3, 2, 32), Start(8),
    ]  # fmt: skip
    # Trial 4 is due for promotion too, but its extra 8 no longer fits: the sweep ends there.
    assert ledger.spent() == 96 and ledger.available() == 4
    states = {n: (t.rung, t.state) for n, t in trials.items()}
    assert states == {0: (0, PAUSED), 1: (1, PAUSED), 2: (2, TrialState.DONE),
                      3: (2, TrialState.DONE), 4: (0, PAUSED)}  # fmt: skip
