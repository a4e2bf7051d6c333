"""The mode chooser's predictions (edge_runtime.collab.chooser): each formula against a hand
computation, and the choices they lead to on the links and loads the issue names."""
import math

import pytest

from edge_runtime.collab.chooser import ID_BYTES, RPC_BYTES, Observed, accepted_per_call, choose, predict

BASE = dict(rate_bps=10e6, device_token_s=0.004, cloud_token_s=0.006, layers=8, exit_layer=4, state_bytes=392)


def rows(o, n=32):
    return {r.mode: r for r in predict(o, n)}


def test_accepted_per_call_is_the_geometric_sum():
    assert accepted_per_call(0.0, 5) == 1.0           # nothing accepted: the cloud's own token
    assert accepted_per_call(1.0, 5) == 6.0           # all 5 drafts and the bonus token
    assert accepted_per_call(0.5, 2) == pytest.approx(1 + 0.5 + 0.25)


def test_each_mode_against_a_hand_computation():
    o = Observed(rtt_s=0.08, exit_rate=0.25, acceptance=0.6, prefill_s=0.01, **BASE)
    r = rows(o)
    wire = lambda b: (b + RPC_BYTES) * 8 / 10e6  # noqa: E731
    assert r["standalone"].seconds_per_token == 0.004
    assert r["cloud-only"].seconds_per_token == pytest.approx(0.08 + 0.006 + wire(ID_BYTES))
    assert r["cloud-stream"].seconds_per_token == pytest.approx((0.08 + 0.01 + wire(ID_BYTES * 32)) / 32 + 0.006)
    assert r["collaborative"].seconds_per_token == pytest.approx(0.004 + 0.75 * (0.08 + 0.003 + wire(392 / 0.75)))
    assert r["collaborative"].cloud_layer_evals_per_token == 4      # exact catch-up: layers [4, 8) of every token
    g = r["speculative"].gamma
    E = accepted_per_call(0.6, g)
    assert r["speculative"].seconds_per_token == pytest.approx(
        (g * 0.004 + 0.08 + wire(ID_BYTES * (g + 1)) + 0.006 * (1 + 0.15 * g)) / E)
    assert r["speculative"].cloud_layer_evals_per_token == pytest.approx(8 * (g + 1) / E)


def test_speculative_takes_the_gamma_that_predicts_fastest():
    o = Observed(rtt_s=0.08, acceptance=0.9, **BASE)
    best = rows(o)["speculative"]
    from edge_runtime.collab.chooser import speculative_row
    assert all(speculative_row(o, g).seconds_per_token >= best.seconds_per_token for g in range(1, 9))
    low = rows(Observed(rtt_s=0.08, acceptance=0.1, **BASE))["speculative"]
    assert low.gamma < best.gamma                       # poor acceptance: shorter drafts


def test_token_id_catch_up_sends_ids_and_the_cloud_runs_every_layer():
    ids = rows(Observed(rtt_s=0.08, exit_rate=0.5, catch_up="tokens", **BASE))["collaborative"]
    states = rows(Observed(rtt_s=0.08, exit_rate=0.5, **BASE))["collaborative"]
    assert ids.cloud_layer_evals_per_token == 8 and states.cloud_layer_evals_per_token == 4
    assert ids.seconds_per_token < states.seconds_per_token        # fewer bytes on a 10 Mbit link
    prop = rows(Observed(rtt_s=0.08, exit_rate=0.5, catch_up="propagated", kv_share=0.1, **BASE))["collaborative"]
    assert prop.cloud_layer_evals_per_token == pytest.approx(0.5 * 4 + 0.5 * 4 * 0.1)


def test_choices_on_the_issue_links_and_loads():
    # an idle cloud: streaming pays the round trip once and wins on either link
    assert choose(Observed(rtt_s=0.01, acceptance=0.7, **BASE), 32).mode == "cloud-stream"
    assert choose(Observed(rtt_s=0.08, acceptance=0.7, **BASE), 32).mode == "cloud-stream"
    # a loaded cloud (each step 60 ms for everyone) and good drafts: verifying several tokens per
    # step beats one token per step
    busy = dict(BASE, cloud_token_s=0.06)
    assert choose(Observed(rtt_s=0.01, acceptance=0.9, **busy), 32).mode == "speculative"
    # per-token cloud-only is never the pick while streaming is possible
    assert all(choose(Observed(rtt_s=rtt, acceptance=a, **BASE), 32).mode != "cloud-only"
               for rtt in (0.01, 0.08) for a in (0.0, 0.9))


def test_lossy_modes_only_within_the_quality_limit_and_standalone_when_the_link_is_down():
    o = Observed(rtt_s=0.08, exit_rate=0.9, collab_ppl_increase=0.02, standalone_ppl_increase=0.4,
                 **dict(BASE, cloud_token_s=0.2))
    assert choose(o, 32).mode != "collaborative"                  # default: lossless only
    better = Observed(rtt_s=0.08, exit_rate=0.9, collab_ppl_increase=-0.02, **dict(BASE, cloud_token_s=0.2))
    assert choose(better, 32).mode != "collaborative"             # lower perplexity, yet other tokens
    assert choose(o, 32, max_ppl_increase=0.05).mode == "collaborative"
    down = choose(Observed(rtt_s=None, **BASE), 32)
    assert down.mode == "standalone" and [r.mode for r in down.rows] == ["standalone"]


@pytest.mark.parametrize("bad,why", [(dict(rate_bps=0), "rate_bps"), (dict(device_token_s=-1), "device_token_s"),
                                     (dict(exit_rate=1.5), "exit_rate"), (dict(exit_layer=8), "exit_layer"),
                                     (dict(cloud_token_s=math.nan), "cloud_token_s")])
def test_bad_observations_are_refused(bad, why):
    with pytest.raises(ValueError, match=why):
        Observed(rtt_s=0.01, **{**BASE, **bad})


def test_the_measured_acceptance_is_per_draft_not_accepted_over_drafted():
    """Rounds of 8 drafts, each accepted with chance 0.8 once the ones before it were: a round stops
    judging at its first rejection, so accepted / drafted says about 0.42; the per-draft estimate
    the chooser is given (speculative.Gamma.acceptance) says about 0.8."""
    import random

    from edge_runtime.collab.speculative import Gamma
    gamma, rng, estimates, accepted, drafted = Gamma(8), random.Random(0), [], 0, 0
    assert gamma.acceptance == 0.5                          # nothing measured yet
    for _ in range(2000):
        m = 0
        while m < 8 and rng.random() < 0.8:
            m += 1
        gamma.update(8, m)
        estimates.append(gamma.acceptance)
        accepted, drafted = accepted + m, drafted + 8
    assert 0.72 < sum(estimates) / len(estimates) < 0.85
    assert accepted / drafted < 0.5


def test_the_stream_is_predicted_from_its_own_step_when_measured():
    """A call's own costs are in c, not in a streamed token: with the stream's step measured (s), a
    stream is predicted from it, and a cloud whose calls cost more than its steps is streamed from."""
    o = Observed(rtt_s=0.002, acceptance=0.5, prefill_s=0.1, **BASE)          # c = 6 ms, a long prefill
    assert choose(o, 32).mode == "cloud-only"
    fast = Observed(rtt_s=0.002, acceptance=0.5, prefill_s=0.1, stream_token_s=0.003, **BASE)
    assert rows(fast)["cloud-stream"].seconds_per_token == pytest.approx(
        (0.002 + 0.1 + (ID_BYTES * 32 + RPC_BYTES) * 8 / 10e6) / 32 + 0.003)
    assert choose(fast, 32).mode == "cloud-stream"
    with pytest.raises(ValueError, match="stream_token_s"):
        Observed(rtt_s=0.002, stream_token_s=0.0, **BASE)
