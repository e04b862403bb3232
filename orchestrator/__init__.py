"""Ray Tune orchestration of RCIG sweeps: the only package that imports Ray.

Modules: `spec` (sweep specs, validated without Ray), `sweep` (launch/resume),
`trial` + `trial_worker` (one resumable trial), `callbacks` (Tune follows the trial's
two budgets), `manifest` (our record in storage), `results` (status/best/fetch from
storage alone), `locate` (sweep names and URIs), `cluster`/`devices` (cluster configs,
per-trial devices), `report` (HTML report).

Importing this package imports nothing heavy; Ray is imported where it is needed.
"""
