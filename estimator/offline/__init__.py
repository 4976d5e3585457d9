"""The offline pipeline: label, train, evaluate, compare, replay (and fit the stopping table).

Nothing here runs while serving. These modules build what the server loads (the T2 head, its
stopping table) and measure it, so they import the online pieces they fit and replay
(estimator.policies, estimator.policy_spec, estimator.head, estimator.learned_stopping) and
the server's own rules (server.voting, server.parallel, ...). The other way round never
happens: online code (estimator/*.py, server/*) does not import estimator.offline, except
the `t2serve label/train/evaluate` handlers in server/cli.py, lazily inside the handler.
"""
