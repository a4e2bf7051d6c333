"""Adaptive switching with scripted models: consistency, confidence, hysteresis and device state on
class + position outputs; the three strategies, fusion and per-stream state on a 4-DoF pose stream
with a jump, a smooth segment and an occlusion."""
import numpy as np
import pytest

from edge_runtime.vision.switch import AdaptiveSwitch, DeviceState, StreamState, SwitchConfig


def out(cls, x=0.5, y=0.5, sure=True):
    logits = np.zeros(10)
    logits[cls] = 10.0 if sure else 0.5
    return np.concatenate([logits, [x, y]])


class Scripted:
    def __init__(self, outputs):
        self.outputs, self.calls = list(outputs), 0

    def __call__(self, frame):
        self.calls += 1
        return self.outputs[frame]


def test_consistent_small_never_escalates():
    small, big = Scripted([out(3, 0.5 + 0.01 * i) for i in range(20)]), Scripted([out(3)] * 20)
    sw = AdaptiveSwitch(small, big)
    ran = [sw.step(i).ran for i in range(20)]
    assert all(r == ("small",) for r in ran) and big.calls == 0


def test_class_change_escalates_and_holds_then_returns():
    small_out = [out(3)] * 5 + [out(7)] + [out(7)] * 14
    small, big = Scripted(small_out), Scripted([out(3)] * 5 + [out(7)] * 15)
    sw = AdaptiveSwitch(small, big, SwitchConfig(hold=4))
    answers = [sw.step(i) for i in range(20)]
    assert answers[5].ran == ("small", "big") and answers[5].reason == "class changed"
    assert [a.ran for a in answers[6:10]] == [("big",)] * 4            # hysteresis: held on the big model
    assert answers[10].ran == ("small",)                                # then back to the small one
    assert int(answers[5].output[:10].argmax()) == 7


def test_low_confidence_and_position_jump_escalate():
    small = Scripted([out(1), out(1, sure=False), out(1), out(1, x=0.9)])
    big = Scripted([out(1)] * 4)
    sw = AdaptiveSwitch(small, big, SwitchConfig(hold=0))
    reasons = [sw.step(i).reason for i in range(4)]
    assert reasons == ["", "low confidence", "", "position jumped"]


def test_device_state_low_battery_is_frugal_and_good_link_uses_cloud():
    small = Scripted([out(1), out(1, sure=False), out(2), out(2)])
    big, cloud = Scripted([out(1), out(1), out(2), out(2)]), Scripted([out(1), out(1), out(2), out(2)])
    sw = AdaptiveSwitch(small, big, SwitchConfig(hold=4), run_cloud=cloud)
    low = DeviceState(battery=0.1)
    assert sw.step(0, low).ran == ("small",)
    assert sw.step(1, low).ran == ("small",)          # low confidence tolerated on a low battery
    a = sw.step(2, low)                               # a class change still escalates, held half as long
    assert a.ran == ("small", "big") and sw.stream.hold_left == 2
    sw.stream.hold_left = 0
    sw.stream.previous = out(5)
    assert sw.step(3, DeviceState(link_quality=0.9)).ran == ("small", "cloud")


# --- pose: 4 regression outputs, the small model's predicted error as its fifth -------------------
JUMP, OCCLUDED = 10, range(20, 26)


def pose_streams(n=32):
    """(small outputs (n, 5), big outputs (n, 4)): smooth motion, a fast manoeuvre at JUMP (the small
    model's output jumps with it, its predicted error stays low: the frame is clear), an occlusion
    over OCCLUDED (the small model's output stays plausible and wrong; its predicted error is high)."""
    t = np.arange(n)
    truth = np.stack([0.5 + 0.002 * t, 0.4 + 0.001 * t, 0.5 + 0 * t, 0.3 + 0 * t], 1)
    truth[JUMP:, 0] += 0.2
    small = truth + 0.01
    small[list(OCCLUDED)] = small[OCCLUDED.start - 1]             # stuck, not jumping
    aux = np.full(n, 0.02)
    aux[list(OCCLUDED)] = 0.2
    aux[OCCLUDED.stop:OCCLUDED.stop + 2] = 0.04                  # recovering: between release and threshold
    return np.concatenate([small, aux[:, None]], 1), truth.copy()


def run(config, n=32, state=None):
    so, bo = pose_streams(n)
    small, big = Scripted(list(so)), Scripted(list(bo))
    sw = AdaptiveSwitch(small, big, config)
    return [sw.step(i, state) for i in range(n)], small, big


def escalations(answers):
    return [i for i, a in enumerate(answers) if a.reason and a.reason != "hold"]


def test_consistency_escalates_on_the_jump_and_misses_the_occlusion():
    answers, _, big = run(SwitchConfig(regression=4, aux=1, max_jump=0.1, hold=2))
    assert escalations(answers) == [JUMP] and answers[JUMP].reason == "position jumped"
    assert [a.ran for a in answers[JUMP:JUMP + 4]] == [("small", "big"), ("big",), ("big",), ("small",)]
    assert all(a.ran == ("small",) for a in answers[OCCLUDED.start:OCCLUDED.stop])
    assert answers[0].output.shape == (4,) and answers[0].predicted_error == pytest.approx(0.02)


def test_auxiliary_escalates_proactively_on_the_occlusion_and_not_on_a_clear_jump():
    answers, _, _ = run(SwitchConfig(strategy="auxiliary", regression=4, aux=1, aux_threshold=0.05, hold=2))
    assert escalations(answers) == [20, 23] and answers[20].reason == "predicted error"
    assert answers[JUMP].ran == ("small",)
    assert [a.ran for a in answers[20:23]] == [("small", "big"), ("big",), ("big",)]


def test_combined_escalates_on_both_and_returns_after_hold_calm_frames():
    config = SwitchConfig(strategy="combined", regression=4, aux=1, max_jump=0.1, aux_threshold=0.05,
                          aux_release=0.03, hold=2)
    answers, small, big = run(config)
    assert small.calls == 32                                       # the small model runs on every frame
    assert answers[JUMP].reason == "position jumped" and answers[20].reason == "predicted error"
    on_big = [i for i, a in enumerate(answers) if "big" in a.ran]
    # the jump: escalated at 10, calm at 11 and 12 (answered big), back at 13
    assert on_big[:3] == [10, 11, 12] and answers[13].ran == ("small",)
    # the occlusion: 20-25 unsure, 26-27 between release and threshold (not calm), 28-29 calm, back at 30
    assert on_big[3:] == list(range(20, 30)) and answers[30].ran == ("small",)


def test_fusion_weights_the_small_models_regression_when_both_ran():
    answers, _, _ = run(SwitchConfig(regression=4, aux=1, max_jump=0.1, hold=0, fuse=[0.5, 0.0, 0.0, 1.0]))
    so, bo = pose_streams()
    got = answers[JUMP].output
    assert got == pytest.approx([0.5 * so[JUMP, 0] + 0.5 * bo[JUMP, 0], bo[JUMP, 1], bo[JUMP, 2], so[JUMP, 3]])


def test_frugal_device_doubles_the_aux_threshold_and_halves_the_hold():
    config = SwitchConfig(strategy="auxiliary", regression=4, aux=1, aux_threshold=0.15, hold=4)
    answers, _, _ = run(config, state=DeviceState(battery=0.1))
    assert escalations(answers) == []                              # 0.2 <= 2 x 0.15
    answers, _, _ = run(SwitchConfig(strategy="auxiliary", regression=4, aux=1, aux_threshold=0.08, hold=4),
                        state=DeviceState(battery=0.1))
    assert escalations(answers) == [20, 23] and [a.ran for a in answers[21:23]] == [("big",)] * 2


def test_frugal_device_doubles_the_jump_threshold():
    config = SwitchConfig(regression=4, aux=1, max_jump=0.15, hold=2)
    assert escalations(run(config)[0]) == [JUMP]                                  # a 0.2 jump > 0.15
    assert escalations(run(config, state=DeviceState(temperature_c=90))[0]) == []  # <= 2 x 0.15 when hot


def test_interleaved_streams_keep_their_own_state():
    config = SwitchConfig(strategy="combined", regression=4, aux=1, max_jump=0.1, aux_threshold=0.05, hold=2)
    alone_a, _, _ = run(config)
    so, bo = pose_streams()
    shifted = np.roll(so, 7, axis=0), np.roll(bo, 7, axis=0)
    sw_b = AdaptiveSwitch(Scripted(list(shifted[0])), Scripted(list(shifted[1])), config)
    alone_b = [sw_b.step(i) for i in range(32)]
    both = AdaptiveSwitch(lambda f: (so if f[0] == "a" else shifted[0])[f[1]],
                          lambda f: (bo if f[0] == "a" else shifted[1])[f[1]], config)
    a, b = StreamState(), StreamState()
    mixed_a, mixed_b = [], []
    for i in range(32):
        mixed_a.append(both.step(("a", i), None, a))
        mixed_b.append(both.step(("b", i), None, b))
    for alone, mixed in ((alone_a, mixed_a), (alone_b, mixed_b)):
        assert [x.ran for x in alone] == [x.ran for x in mixed]
        assert all(np.array_equal(x.output, y.output) for x, y in zip(alone, mixed))


@pytest.mark.parametrize("settings, field", [
    ({"strategy": "psychic"}, "strategy"),
    ({"strategy": "auxiliary"}, "aux"),                     # no predicted error to act on
    ({"hold": -1}, "hold"),
    ({"hold": 1.5}, "hold"),
    ({"max_jump": float("nan")}, "max_jump"),
    ({"fuse": 1.5}, "fuse"),
    ({"fuse": [0.5, 0.5, 0.5]}, "fuse"),                    # regression is 2
    ({"aux": 1, "aux_threshold": 0.05, "aux_release": 0.1}, "aux_release"),
    ({"max_jmp": 0.1}, "max_jmp"),
    ({"confidence": "high"}, "confidence"),
])
def test_bad_settings_name_the_field(settings, field):
    with pytest.raises(ValueError, match=f"'{field}'"):
        SwitchConfig.from_dict(settings)
