"""Where a job's images are made: ``local`` (this process, one engine) or ``ray`` (an actor pool of engines
on a Ray cluster, imported only when ``--ray`` is given). Both hand each finished image to the same writer."""
