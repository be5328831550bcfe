"""Privacy that is measured: attacks on what leaves the data owner at each candidate cut
(:mod:`~splitlearn.privacy.attacks`, :mod:`~splitlearn.privacy.measure`), their cache, and
the bounds the planner honours (:mod:`~splitlearn.privacy.bound`)."""
