"""Adaptive switching: consistency, confidence, hysteresis and device state, with scripted models."""
import numpy as np

from edge_runtime.vision.switch import AdaptiveSwitch, DeviceState, SwitchConfig


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
    assert a.ran == ("small", "big") and sw.hold_left == 2
    sw.hold_left = 0
    sw.previous = out(5)
    assert sw.step(3, DeviceState(link_quality=0.9)).ran == ("small", "cloud")
