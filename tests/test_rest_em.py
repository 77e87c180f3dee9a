"""ReST-EM's E-step filter on hand-built samples."""

from posttrain.algorithms.rest_em import select_verified


def test_keeps_exactly_the_verified_finished_samples_deduplicated_and_capped():
    #            problem 0 ---------------------------  problem 1 -------------  problem 2
    problem = [0, 0, 0, 0, 0, 0, 1, 1, 1, 2]
    comps = [(1,), (1,), (2,), (3,), (4,), (5,), (7,), (8,), (7,), (9,)]
    correct = [True, True, False, True, True, True, True, True, True, False]
    finished = [True, True, True, False, True, True, True, True, True, True]
    kept = select_verified(problem, comps, correct, finished, max_per_problem=2)
    # problem 0: #0 kept; #1 duplicate of #0; #2 wrong; #3 truncated; #4 kept (cap 2 reached); #5 over the cap.
    # problem 1: #6 and #7 kept; #8 duplicate. problem 2: nothing correct.
    assert kept == [0, 4, 6, 7]
    assert all(correct[i] and finished[i] for i in kept)
    for p in set(problem):
        mine = [comps[i] for i in kept if problem[i] == p]
        assert len(mine) == len(set(mine)) <= 2


def test_one_sample_per_problem_reduces_to_rejection_sampling_fine_tuning():
    # K=1: every correct, finished sample is kept, whatever the cap.
    problem = list(range(6))
    comps = [(i,) for i in range(6)]
    correct = [True, False, True, True, False, True]
    finished = [True] * 6
    for cap in (1, 10):
        assert select_verified(problem, comps, correct, finished, cap) == [0, 2, 3, 5]


def test_a_verifier_crash_on_one_sample_counts_it_incorrect_and_scores_the_rest(monkeypatch):
    from posttrain.workers.verifier import VerifierWorker

    worker = VerifierWorker("arithmetic")
    real = worker.verifier.extract
    monkeypatch.setattr(worker.verifier, "extract", lambda c: 1 / 0 if c == "boom" else real(c))
    verdicts = worker.score(["1+1=2;#2", "boom", "2+2=5;#5"], ["2", "2", "4"])
    assert [v.correct for v in verdicts] == [True, False, False]
    assert verdicts[1].error.startswith("ZeroDivisionError") and verdicts[0].error is None


def test_math_verifier_actor_times_out_a_hanging_check_and_scores_the_rest(ray_local):
    """The math verifier's hard timeout holds inside a Ray worker (no signals there: checks run in child processes)."""
    import time

    import ray

    from posttrain.cluster import Demand, spawn
    from posttrain.workers.verifier import VerifierWorker

    with spawn(VerifierWorker, Demand("verifier", 1, 0.5, 0.0), [("math",)]) as (worker,):
        completions = [r"so \boxed{\frac{1}{2}}", r"\boxed{9^{9^{9^{9}}}}", r"\boxed{3}", "no answer here"]
        t0 = time.time()
        verdicts = ray.get(worker.score.remote(completions, ["0.5", "1", "4", "2"]), timeout=120)
        elapsed = time.time() - t0
    assert [v.correct for v in verdicts] == [True, False, False, False]
    assert verdicts[1].error == "timeout" and verdicts[0].error is None
    assert elapsed < 60


def test_driver_side_answer_comparison_cannot_hang():
    import time

    from posttrain.scoring import majority_answer
    from posttrain.verifiers import answer_equal

    equal = answer_equal("math")
    t0 = time.time()
    # The second answer sends sympy into a near-endless evaluation; it must time out, not block voting.
    assert majority_answer([r"\frac{1}{2}", r"9^{9^{9^{9}}}", "0.5"], equal) == r"\frac{1}{2}"
    assert time.time() - t0 < 30
    assert answer_equal("arithmetic")("6", "+6")
