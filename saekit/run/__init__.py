"""The run layer: everything that turns a run config into work on a run folder.

Why a layer of its own, at the top of the library: the stages (cache → train → eval → probe →
analyze), the run configs, multi-SAE runs and experiment runners such as MDL selection each call
several lower layers and write into a run folder. Gathered here, no lower layer ever imports them:
`train/` knows SAEs and batch sources, `store/` knows stores, and the folder's layout itself is
`saekit.layout.RunFolder` in the base layer.

* `saekit.run.config` — `RunConfig`, `MultiConfig`, `load_run_config(path)` for either kind
* `saekit.run.stages` — the stages, single-SAE training, distributed caching, `eval_target`, `analyze_run`,
  `import_sae_stage` (a config's `sae: {from: PATH}`) and `checked_sae_and_store` (the preflight)
* `saekit.run.multi` — several SAEs from one model pass
* `saekit.run.mdl_select` — minimum-description-length selection over a grid of SAEs
"""
