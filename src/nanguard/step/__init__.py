"""The always-on path: one optimizer step in, one verdict out.

``apply`` runs the guarded ``optimizer.step()`` (sync and fused strategies); ``verdict`` is the only place
the step's device vector is encoded and decoded; ``detector`` owns the running statistics and the limits
a step is judged by; ``norms`` are the device reductions; ``readback`` brings vectors to the host without
waiting; ``lockstep`` keeps ranks in agreement; ``losses`` decides whose loss a ``backward()`` was;
``scaler`` watches GradScalers.
"""
