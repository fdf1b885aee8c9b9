"""Performance accounting without a GPU: FLOPs and MFU (:mod:`.flops`), peak memory per rank on fake
tensors (:mod:`.memory`), communication volume and the scaling floor (:mod:`.comm`), per-phase step timing
(:mod:`.timing`), host-synchronisation counting (:mod:`.syncs`) and ``poa profile`` (:mod:`.profile`).
``poa estimate flops|memory|comm`` is :mod:`.cli`."""
