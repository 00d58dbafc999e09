"""Everything that touches Kafka: message models and published schemas (`models`,
`schema_files`), the ingest decoder (`decode`), clients (`clients`), topic admin (`topics`), the
embedded broker (`broker`), dead letters (`deadletters`), log readers (`logs`), the replay producer
(`replay`), the synthetic stream (`synthetic`) and the test Kafka (`testing`). A leaf package: it
imports neither casm_core, state nor consumers."""
