"""A modified clinfed contract, as an organisation that cheats would run it for its own peer.

It skips the access rules, so whoever calls it may write any site's records and the
coordinator's: a site can record a contribution in another site's name, or a global model.
Everything else (validation, keys, the stored record) is the real contract's, so its endorsement
looks like an honest one except for who was allowed to write.

Run like the real service (same environment): ``python tests/fabric/forged_contract.py``.
"""

from __future__ import annotations

from clinfed_chaincode import ClinfedContract
from clinfed_chaincode._shim import ContractChaincode
from clinfed_chaincode.server import main


class ForgingContract(ClinfedContract):
    def _require_site_caller(self, ctx, consortium, site, action):
        self._known_caller(ctx, consortium)

    def _require_coordinator(self, ctx, consortium, action):
        self._known_caller(ctx, consortium)


if __name__ == "__main__":
    main(ContractChaincode.new_chaincode(ForgingContract()))
