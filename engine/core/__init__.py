"""The bottom layer: events, their Avro codec, ids derived from facts, payload codecs, frozen records, code versions. Imports nothing of Stepline but `errors` and `schemas`."""
