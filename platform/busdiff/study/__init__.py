"""The study: the paper's configurations compared in one resumable job (``run_study(cfg)``), thin over the
stages: ``plan`` turns the config into keyed stage runs, ``run`` runs what is not finished, ``results``
joins the stages' outputs into study.json, ``report`` renders report.html. No stage logic lives here."""
