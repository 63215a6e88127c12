"""Benchmarks: the method leaderboard (``bench methods``) and lorakit-vs-PEFT performance (``bench perf``)."""
