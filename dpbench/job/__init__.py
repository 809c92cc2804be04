"""One job's life around the training loop: resuming it from its folder (``resume``), the loop's
hooks (``hooks``) and the record at its end (``record``). Unlike ``dpbench.train``, which never
imports ``dpbench.privacy``, these wire the privacy mechanism, its randomness and release policy
into a run."""
