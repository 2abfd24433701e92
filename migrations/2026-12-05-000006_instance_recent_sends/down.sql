ALTER TABLE daemon_instances DROP COLUMN recent_sends, DROP COLUMN recent_sends_until;
