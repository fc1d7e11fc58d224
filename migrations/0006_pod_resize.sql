-- A live resize waiting to be sent to the pod's node (cleared when the scheduler sends it).
ALTER TABLE pods ADD COLUMN resize_requested boolean NOT NULL DEFAULT false;
