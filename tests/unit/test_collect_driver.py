"""dicp_ray.collect.driver's throughput figure (issue #24): measured from the learners' own start, not Ray's."""
import math

from dicp_ray.collect.driver import learning_start


def test_rate_clock_starts_when_the_first_learner_starts_learning():
    # Ray starts at t = 0; learners need 20 s of worker start-up, then learn: A for 10 s (ends t = 30), B for 25 s
    # (starts at t = 20 as well, ends t = 45). The clock starts at t = 20, not 0.
    start = learning_start(math.inf, {"wall_s": 10.0}, now=30.0)
    assert start == 20.0
    assert learning_start(start, {"wall_s": 25.0}, now=45.0) == 20.0
    # a later learner that began earlier than any seen so far moves the start back; no wall_s: its arrival time
    assert learning_start(start, {"wall_s": 40.0}, now=50.0) == 10.0
    assert learning_start(math.inf, {}, now=7.0) == 7.0
