"""The built-in offline corpus (:mod:`.make`), from eSpeak NG speech (:mod:`.speech`) and numpy sounds (:mod:`.sounds`)."""
