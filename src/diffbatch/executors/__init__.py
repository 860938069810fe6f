"""Where a job's images are made: ``local`` (this process, one engine) or ``ray`` (an actor pool of engines
on a Ray cluster, imported only when ``--ray`` is given: the address given, RAY_ADDRESS, a running ``ray start``
cluster, else a fresh local one; ``ray.choose_cluster``). Both hand each finished image to the same writer."""
