"""A coordinator written to cheat: ``SecAggFedAvg`` that deviates from the protocol to learn one
site's update, and keeps everything it ever holds in ``<run dir>/held.npz`` for the test to
examine (every site's masked input, every opened sum, its best reconstruction of the target).

Cheats (``cheat``):

- ``fake_site``: lists a name that is not a site of the consortium, ``site-evil``.
- ``listed_names``: lists exactly ``names`` (two names of one organisation, a coordinator-owned
  name, a list of two).
- ``claim_dropout``: every masked input arrives; it calls ``target`` dropped to get the shares of its
  ephemeral key, strips ``target``'s pairwise masks, then asks again with ``target`` among the
  survivors to get its self-mask seed.
- ``keep_late``: ``target`` is slow; the coordinator recovers the round without it and keeps the
  train task open, so the target's input still arrives after recovery (FLARE would end the task
  and drop it); it strips its pairwise masks, then the second unmask request as above.
- ``swap_key``: from round 1 on, registers a new key for ``target`` on the ledger (as one who stole
  the target's ledger identity) and replaces ``target``'s setup message with one made under that
  key, so it could read the shares the other sites send ``target``.
"""

from __future__ import annotations

import os
import time

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from nvflare.app_common.abstract.fl_model import FLModel
from nvflare.app_common.app_constant import AppConstants

from clinfed.privacy import secagg
from clinfed.privacy.errors import SecAggRefused
from clinfed.workflows.secagg_fedavg import SecAggFedAvg


class CheatingCoordinator(SecAggFedAvg):
    # Every argument spelled out: FLARE's job export reads a component's arguments from its signature.
    def __init__(self, cheat: str, target: str = "site-1", names: list | None = None, ledger: str = "", *,
                 num_clients: int = 3, num_rounds: int = 1, persistor_id: str = "", model: dict | None = None,
                 weight_bound: float = 1e4, setup_timeout: int = 30, train_timeout: int = 30,
                 unmask_timeout: int = 30):
        super().__init__(num_clients=num_clients, num_rounds=num_rounds, persistor_id=persistor_id, model=model,
                         weight_bound=weight_bound, setup_timeout=setup_timeout, train_timeout=train_timeout,
                         unmask_timeout=unmask_timeout)
        self.cheat, self.target, self.names, self.ledger = cheat, target, names or [], ledger
        self._held: dict[str, np.ndarray] = {}

    # -- what it holds ----------------------------------------------------------------------

    def _hold(self, name: str, ring) -> None:
        self._held[name] = np.asarray(ring, dtype=np.uint32).view(np.int32).astype(np.float64)

    def _save(self) -> None:
        np.savez(os.path.join(self.get_run_dir(), "held.npz"), **self._held)

    def run(self) -> None:
        try:
            super().run()
        finally:
            self._save()

    # -- the deviations -----------------------------------------------------------------------

    def sample_clients(self, num_clients=None):
        clients = super().sample_clients(num_clients)
        if self.cheat == "fake_site":
            return clients + ["site-evil"]
        if self.cheat == "listed_names":
            return list(self.names)
        return clients

    def _stage(self, task_name, meta, targets, timeout):
        # Tasks go to the real clients only; the fake names just stand in the list.
        real = {c.name for c in self.engine.get_clients()}
        return super()._stage(task_name, meta, [t for t in targets if t in real], timeout)

    def secure_round(self, model):
        if self.cheat not in ("claim_dropout", "keep_late", "swap_key") or (
                self.cheat == "swap_key" and self.current_round == 0):
            return super().secure_round(model)
        server = self.set_up_round()
        context = server.context
        if self.cheat == "swap_key" and context.round >= 1:
            self._swap_target_key(server, context)
        self._masked_sum, self._inputs = None, {}
        model.meta = dict(model.meta or {})
        model.meta[secagg.META_KEY] = {"context_id": context.context_id, "share_senders": server.share_senders,
                                       "ciphertexts": server.relay()}
        self.send_model(task_name=AppConstants.TASK_TRAIN, data=model, targets=server.share_senders,
                        timeout=self.train_timeout, callback=self._keep_masked_input)
        others = [s for s in server.share_senders if s != self.target]
        if self.cheat == "keep_late":  # recover without the target while its task stays open
            while not set(others) <= set(self._inputs):
                time.sleep(self._task_check_period)
        else:
            while self.get_num_standing_tasks():
                time.sleep(self._task_check_period)
        survivors = [s for s in sorted(self._inputs) if s != self.target]
        answers = self._answers(context, survivors) if survivors else {}
        while self.get_num_standing_tasks():  # the target's input, late
            time.sleep(self._task_check_period)
        model.meta.pop(secagg.META_KEY)
        if self.target in self._inputs and answers:
            self._strip_pairwise(server, context, answers)
            # Now the seed: ask again, this time with the target among the survivors.
            self._answers(context, sorted(self._inputs))
        raise SecAggRefused(f"{self.cheat}: the coordinator is done cheating in round {context.round}")

    def _keep_masked_input(self, result: FLModel) -> bool:
        site = self._sender(result)
        layout = secagg.layout_of(result.params)
        ring = secagg.ring_of(result.params, layout)
        self._hold(f"masked_input_{site}", ring)
        self._inputs[site] = {"ring": ring, "layout": layout}
        return True

    def _answers(self, context, survivors) -> dict:
        replies = self._stage(secagg.UNMASK_TASK, {"context_id": context.context_id, "survivors": survivors},
                              survivors, self.unmask_timeout)
        answers = {self._sender(r): r.meta[secagg.META_KEY] for r in replies if secagg.META_KEY in (r.meta or {})}
        if len(answers) >= context.threshold and all(s in self._inputs for s in survivors):
            total = sum((self._inputs[s]["ring"] for s in survivors), np.zeros_like(self._inputs[survivors[0]]["ring"]))
            try:
                self._hold(f"opened_sum_{'_'.join(survivors)}", self._round.unmask(total, survivors, answers))
            except SecAggRefused as err:
                self.warning(f"cheat: could not open {survivors}: {err}")
        self._last_answers = answers
        return answers

    def _strip_pairwise(self, server, context, answers) -> None:
        """The target's masked input without its pairwise masks, from the shares of its ephemeral
        key that the survivors revealed when told the target had dropped."""
        shares = {int(a["index"]): bytes.fromhex(a["key_shares"][self.target]) for a in answers.values()
                  if self.target in a.get("key_shares", {})}
        if len(shares) < context.threshold:
            return
        ephemeral = X25519PrivateKey.from_private_bytes(secagg._combine(dict(sorted(shares.items())[:context.threshold])))
        stripped = np.array(self._inputs[self.target]["ring"], dtype=np.uint32)
        for peer in server.share_senders:
            if peer == self.target:
                continue
            seed = secagg._pair_seed(ephemeral, bytes.fromhex(server.setups[peer]["ephemeral_public"]))
            pair = secagg.MaskStream(stripped.size).pair(seed, context, self.target, peer)
            if self.target < peer:
                stripped -= pair
            else:
                stripped += pair
        self._hold("target_without_pairwise_masks", stripped)

    def _swap_target_key(self, server, context) -> None:
        from clinfed.ledger.settings import ledger_settings

        stolen = X25519PrivateKey.generate()
        with ledger_settings(self.target, ledger=self.ledger).open(outbox=False) as ledger:
            ledger.register_site_key(self.target, secagg.public_key_bytes(stolen))
            registry = secagg.SiteRegistry.from_ledger(ledger)
        _, forged = secagg.setup(context, site=self.target, long_term=stolen, registry=registry)
        server.setups[self.target] = forged
        self.warning(f"cheat: {self.target}'s key swapped on the ledger and its setup message forged")
