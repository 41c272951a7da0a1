"""Commands that read a run or a checkpoint after (or beside) training: export, eval, chat and generate,
report. They need torch, so the CLI imports each only inside its command. Tools may use rank code (the data
pipeline, checkpoint reading); rank code never imports tools."""
