"""Workers = where. verl's actor/rollout/ref worker and critic worker with the reuse engines.

The engines come from verl's EngineRegistry (see `registry.py`); the actor's `prefix_reuse`
settings ride on its engine config. The reference policy has its own engine config, so the
actor's switch is copied onto it here: reference log-probs reuse prefixes whenever the actor does.
"""

from __future__ import annotations

from verl.single_controller.base.decorator import Dispatch, register
from verl.workers.engine_workers import ActorRolloutRefWorker, TrainingWorker

from .config import as_settings, attach
from .registry import install_engines


class PrefixReuseTrainingWorker(TrainingWorker):
    """TrainingWorker (critic, or actor/ref inside the actor worker) built on the reuse engines."""

    def __init__(self, config):
        install_engines()
        super().__init__(config)


class PrefixReuseActorRolloutRefWorker(ActorRolloutRefWorker):
    actor_worker_cls = PrefixReuseTrainingWorker
    ref_worker_cls = PrefixReuseTrainingWorker

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def init_model(self):
        super().init_model()
        # Read from the raw config: a "ref"-only worker has no actor engine to copy from.
        settings = as_settings(self.config.actor.get("prefix_reuse", None))
        if self.ref is not None:
            attach(self.ref.engine.engine_config, settings)
