"""The spike guard's judgement on series whose spikes are known: from the end of the warmup, against a
baseline that the steps it lets through cannot move, with a rollback that stays due until it is taken and
is read one step late; its state saved and loaded whole."""

import math

import torch

from gpt2repro.guard import MIN_HISTORY, SpikeGuard


def healthy_series(steps: int, warmup: int, seed: int = 0) -> list[tuple[float, float]]:
    """(loss, grad norm) of a run that is well: the loss falling fast through the warmup, then slowly, with
    batch-to-batch noise; the grad norm noisy around a level."""
    g = torch.Generator().manual_seed(seed)
    series = []
    for step in range(1, steps + 1):
        trend = 10.9 - 4.0 * min(step, warmup) / warmup - 0.002 * max(0, step - warmup)
        noise = torch.randn(2, generator=g)
        series.append((trend + 0.08 * float(noise[0]), 0.6 + 0.05 * float(noise[1])))
    return series


def feed(guard: SpikeGuard, series, first_step: int = 1) -> list[int]:
    """The steps judged spikes."""
    spikes = []
    for step, (loss, norm) in enumerate(series, start=first_step):
        if guard.check(step, torch.tensor(loss), torch.tensor(norm)):
            spikes.append(step)
    return spikes


def test_a_healthy_series_has_no_spike_and_the_first_step_after_the_warmup_is_judged():
    series = healthy_series(300, warmup=60)
    guard = SpikeGuard(zscore=8, window=128, device="cpu", judge_after=60)
    assert feed(guard, series) == []
    assert 0 < guard.take_max_z()["max_z"] < 8
    # The step right after the warmup poisoned (random tokens: a loss near ln(50257)), then one whose grad norm
    # alone is far up: judged only when asked (grad_zscore), its z-score measured all the same.
    poisoned = [*series[:60], (11.5, 0.6), (series[61][0], 4.0), *series[62:70]]
    guard = SpikeGuard(zscore=8, window=128, device="cpu", judge_after=60)
    assert feed(guard, poisoned) == [61] and guard.take_max_z()["max_grad_z"] > 8
    guard = SpikeGuard(zscore=8, window=128, device="cpu", judge_after=60, grad_zscore=8)
    assert feed(guard, poisoned) == [61, 62]


def test_a_stretch_below_the_threshold_moves_neither_level_nor_noise():
    """20 steps a little high (each under the threshold) then one far higher: the median baseline still sees
    the last as the spike it is; a mean and standard deviation over the same window, pulled up by the 20,
    would let it through (z = 7.6 there)."""
    g = torch.Generator().manual_seed(1)
    calm = [(6.0 + 0.05 * float(torch.randn((), generator=g)), 0.6) for _ in range(100)]
    drift = [(6.3 + 0.02 * float(torch.randn((), generator=g)), 0.6) for _ in range(20)]
    guard = SpikeGuard(zscore=10, window=128, device="cpu", judge_after=0)
    assert feed(guard, calm + drift) == []  # z ~6: accepted into the window
    values = guard.values[0, :120]
    assert (7.0 - values.mean()) / values.std() < 10  # the mean/std guard's verdict on 7.0: no spike
    assert feed(guard, [(7.0, 0.6)], first_step=121) == [121]


def test_nothing_is_judged_before_min_history_steps_whatever_the_warmup():
    guard = SpikeGuard(zscore=5, window=128, device="cpu", judge_after=0)
    assert feed(guard, [(7.0, 0.6)] * (MIN_HISTORY - 1) + [(50.0, 0.6)]) == []  # 15 values: too few to judge
    assert int(guard.count) == MIN_HISTORY
    assert feed(guard, [(50.0, 0.6)], first_step=MIN_HISTORY + 1) == [MIN_HISTORY + 1]


def test_a_step_far_below_its_level_or_not_finite_is_no_spike_and_stays_out_of_the_window():
    series = healthy_series(100, warmup=20)
    guard = SpikeGuard(zscore=8, window=32, device="cpu", judge_after=20, grad_zscore=8)
    feed(guard, series)
    window = guard.values.clone()
    assert feed(guard, [(1.0, 0.6)], first_step=101) == []  # far below: no spike, and accepted
    assert not torch.equal(guard.values, window)
    window = guard.values.clone()
    assert feed(guard, [(math.inf, 0.6), (6.0, math.nan)], first_step=102) == []  # the GradScaler's business
    assert torch.equal(guard.values, window)
    assert feed(guard, [(6.5, 9.0)], first_step=104) == [104]  # a grad-norm spike: kept out of the window
    assert torch.equal(guard.values, window)
    # A poisoned batch under float16: a finite loss far up, gradients that overflowed. A spike all the same.
    assert feed(guard, [(12.0, math.inf)], first_step=105) == [105]
    assert torch.equal(guard.values, window)


def test_the_verdict_says_spike_and_when_a_rollback_is_due():
    series = healthy_series(80, warmup=20)
    guard = SpikeGuard(zscore=8, window=64, device="cpu", judge_after=20, rollback_after=3)
    feed(guard, series)
    assert guard.verdict() == (False, False)
    verdicts = []
    for _ in range(3):  # the same step, again and again: a skipped step is not counted
        guard.check(81, torch.tensor(12.0), torch.tensor(3.0))
        verdicts.append(guard.verdict())
    assert verdicts == [(True, False), (True, False), (True, True)] and int(guard.streak_start) == 81
    feed(guard, [series[-1]], first_step=81)  # a clean step ends the streak
    assert guard.verdict() == (False, False) and int(guard.streak) == 0


def test_the_state_comes_back_whole_and_after_a_rollback_every_step_is_judged():
    series = healthy_series(80, warmup=20)
    guard = SpikeGuard(zscore=8, window=64, device="cpu", judge_after=20, rollback_after=4)
    feed(guard, series + [(12.0, 3.0)] * 2)
    again = SpikeGuard(zscore=8, window=64, device="cpu", judge_after=20, rollback_after=4)
    again.load_state_dict(guard.state_dict())
    for name in ("values", "count", "streak", "streak_start", "judge_after"):
        assert torch.equal(getattr(again, name), getattr(guard, name)), name
    again.after_rollback(to_step=10)  # back to a checkpoint inside the warmup: judged from there on
    assert int(again.judge_after) == 10 and again.verdict() == (False, False)
    assert feed(again, [(12.0, 0.6)], first_step=11) == [11]


def test_a_mean_and_std_guards_saved_window_loads_with_its_empty_slots_empty():
    old = {"values": torch.zeros(2, 8), "count": 3, "streak": 0, "streak_start": 0}
    old["values"][:, :3] = torch.tensor([[7.0, 7.1, 6.9], [0.6, 0.7, 0.5]])
    guard = SpikeGuard(zscore=8, window=8, device="cpu", judge_after=0)
    guard.load_state_dict(old)
    assert torch.isnan(guard.values[:, 3:]).all() and float(guard.baseline()[0][0]) == 7.0


def test_the_guards_settings_are_checked_in_one_message():
    from gpt2repro import config as C

    bad = C.TrainConfig(spike_window=1, spike_zscore=-1, max_rollbacks=-1)
    try:
        C.resolve(bad, 1)
    except ValueError as e:
        message = str(e)
    else:
        raise AssertionError("accepted")
    assert f"spike_window must be at least {MIN_HISTORY}" in message and "spike_zscore must be at least 0" in message
    assert "max_rollbacks must be at least 0" in message
    C.resolve(C.TrainConfig(spike_window=MIN_HISTORY), 1)
