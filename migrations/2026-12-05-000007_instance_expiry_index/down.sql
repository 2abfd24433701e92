ALTER TABLE daemon_instances DROP KEY ix_daemon_instances_expires;
