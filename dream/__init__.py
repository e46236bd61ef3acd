"""The dream loop: invariants and judges, on-policy cases, preference triplets, training, rollback and certificates."""
