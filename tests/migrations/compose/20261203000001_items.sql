-- The service's own schema, applied by `CachedPoolOptions::migrations` before capture is installed on it.
CREATE TABLE items (id bigint PRIMARY KEY, version bigint NOT NULL);
INSERT INTO items VALUES (1, 1), (2, 1);
