-- Runs once in each PostgreSQL workgroup container (database "dev").
CREATE ROLE "aad:alice@contoso.example" LOGIN;
CREATE ROLE "aad:bob@contoso.example" LOGIN;
CREATE ROLE "aad:analysts";
CREATE TABLE demo (id int PRIMARY KEY, note text);
INSERT INTO demo VALUES (1, 'hello from behind idgate'), (2, 'only alice and analysts can read this');
GRANT SELECT ON demo TO "aad:alice@contoso.example", "aad:analysts";
